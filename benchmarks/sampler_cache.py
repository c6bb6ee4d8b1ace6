"""The sampler's key/value cache: growing (transformers' DynamicCache) against reserved (ours,
the default, ``ReservedLayer``), CPU time of one ``generate``.

    python benchmarks/sampler_cache.py                                  # 64 x 256 tokens, 2.6M parameters
    python benchmarks/sampler_cache.py --tokens 128 --hidden 512 --rows 16 --samples 4

The model's EOS id is one no token has, so every response runs to ``--tokens`` with every
variant; greedy decoding, so both must produce the same tokens (checked). The variants run
in turn, ``--rounds`` times, the order rotated every round; one torch thread; the first round
warms up and is not reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch

import reinforcepp.engines.kv_cache as kv
from reinforcepp.engines import SamplingParams, SharedPromptSampler
from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rows", type=int, default=16, help="prompts")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
                             context=args.tokens + 64)
    no_eos = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=len(tok) + 5, bos_token_id=tok.bos_token_id)
    prompts = [tok.encode("abcdefghijklmnop")[: 4 + i % 12] for i in range(args.rows)]
    engine = SharedPromptSampler(model, no_eos)
    original = kv.new_cache
    variants = {"growing": lambda reserve=0: original(), "reserved": original}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, list[list[int]]] = {}
    names = list(variants)
    params = SamplingParams(max_new_tokens=args.tokens, greedy=True)
    for r in range(args.rounds):
        for name in names[r % 2:] + names[: r % 2]:
            kv.new_cache = variants[name]
            t0 = time.process_time()
            outputs[name] = engine.generate(prompts, args.samples, params).response_ids
            if r:
                times[name].append(time.process_time() - t0)
    kv.new_cache = original
    same = outputs["growing"] == outputs["reserved"]
    n_params = sum(q.numel() for q in model.parameters())
    print(f"{args.rows * args.samples} rows x {args.tokens} tokens, {n_params / 1e6:.1f}M parameters, "
          f"{args.rounds - 1} timed rounds, CPU seconds per generate, median [range]; same tokens: {same}")
    for name, t in times.items():
        print(f"  {name:<9} {statistics.median(t):6.2f} [{min(t):.2f}-{max(t):.2f}]")


if __name__ == "__main__":
    main()
