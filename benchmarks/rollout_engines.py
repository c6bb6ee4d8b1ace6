"""Completion tokens per second of the generation engines: ``hf`` (our cached sampling loop) vs
``vllm`` (vLLM through our engine) vs ``vllm-raw`` (the same ``vllm.LLM`` called directly).

    bash install.sh vllm                                   # once, in the environment you run it from
    python benchmarks/rollout_engines.py                   # CPU: the corners of the grid, 2 rounds
    python benchmarks/rollout_engines.py --sequences 64 256 512 --new-tokens 32 128 256 --rounds 3
    python benchmarks/rollout_engines.py --bf16            # the same grid with bfloat16 weights on both engines
    python benchmarks/rollout_engines.py --gpu-grid        # the GPU grid: cuda, bfloat16, hidden 1024 x 8 layers,
                                                           # 64/256/512 sequences x 32/128/256 tokens, 3 rounds
    python benchmarks/rollout_engines.py --quick           # smoke run: 16 sequences x 16 tokens, 1 round

Without vLLM installed only the ``hf`` side runs (``--sides`` defaults to the sides this
interpreter can run). Here vLLM lives in its own environment:
``PYTHONPATH=$PWD /work/venv-vllm/bin/python benchmarks/rollout_engines.py``. Estimated wall time
on 2 idle cores: ``--quick`` ~10 s (hf) / ~30 s (with vLLM's start-up); the default grid
~6 min (hf) / ~12 min (all three sides).

What is measured (one process, so both engines hold the same weights):

* **Model:** a randomly initialised Llama built from a config (``--hidden``, ``--layers``,
  ``--heads``, ``--vocab``; no download), in ``--dtype`` on ``--device``. Its EOS id is one that
  no token has, so every sequence runs to ``max_new_tokens``: both engines do exactly
  ``sequences x new_tokens`` tokens of work per call.
* **Work per call:** ``sequences / 8`` random prompts of ``--prompt-len`` tokens, 8 samples each
  (``samples_per_prompt``, vLLM's ``n``), temperature 1, ``new_tokens`` new tokens.
* **Sides:** ``hf`` = ``SharedPromptSampler.generate`` (the default engine); ``vllm`` =
  ``VLLMEngine.generate`` (what the trainer calls: our option mapping, output conversion and
  sampler log-probs included); ``vllm-raw`` = ``vllm.LLM.generate`` with the same
  ``SamplingParams`` (standalone vLLM: the goal is ``vllm`` within 10% of it).
* **Timing:** wall time of one ``generate`` call; completion tokens/s = tokens generated / time.
  vLLM's start-up and the first (warm-up) call of each engine are not timed, and reported apart.
  Every grid cell runs ``--rounds`` rounds; the order of the sides rotates each round, so that
  drift in the machine's load does not favour one side. The table gives the median and the range.
* **Load:** the 1-minute load average is printed before and after (shared machines).

Writes a Markdown table to stdout and, with ``--out``, the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt_len + max(args.new_tokens) + 8,
        bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.eval()
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=args.vocab + 1, bos_token_id=1)  # an EOS no token has
    return model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process (vLLM's CPU worker binds its own)")
    parser.add_argument("--sides", nargs="+", default=None, choices=["hf", "vllm", "vllm-raw"],
                        help="default: all three where vllm imports, else hf")
    parser.add_argument("--bf16", action="store_true", help="--dtype bfloat16")
    parser.add_argument("--gpu-grid", action="store_true",
                        help="--device cuda --dtype bfloat16 --hidden 1024 --layers 8 --heads 8 "
                        "--sequences 64 256 512 --new-tokens 32 128 256 --rounds 3")
    parser.add_argument("--quick", action="store_true", help="smoke run: --sequences 16 --new-tokens 16 --rounds 1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.bf16 or args.gpu_grid:
        args.dtype = "bfloat16"
    if args.gpu_grid:
        args.device, args.hidden, args.layers, args.heads, args.rounds = "cuda", 1024, 8, 8, 3
        args.sequences, args.new_tokens = [64, 256, 512], [32, 128, 256]
    if args.quick:
        args.sequences, args.new_tokens, args.rounds = [16], [16], 1
    have_vllm = importlib.util.find_spec("vllm") is not None
    args.sides = args.sides or (["hf", "vllm", "vllm-raw"] if have_vllm else ["hf"])
    uses_vllm = any(s.startswith("vllm") for s in args.sides)
    if uses_vllm and not have_vllm:
        parser.error(f"--sides {' '.join(args.sides)}: {sys.executable} cannot import vllm (bash install.sh vllm)")

    import torch

    from reinforcepp.engines import SamplingParams, SharedPromptSampler

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; sides {' '.join(args.sides)}", flush=True)
    model, tok = build_model(args)
    engine, startup = None, 0.0
    if uses_vllm:
        from reinforcepp.engines.vllm import VLLMEngine

        t0 = time.perf_counter()
        options = SimpleNamespace(vllm_gpu_memory_utilization=0.5, vllm_sleep=False, seed=0, trust_remote_code=False)
        engine = VLLMEngine(model, tok, device=args.device, config=options)
        startup = time.perf_counter() - t0
        print(f"vLLM start-up (model built, weights loaded): {startup:.1f} s", flush=True)
    hf = SharedPromptSampler(model, tok, device=args.device)
    g = torch.Generator().manual_seed(0)

    def sides(prompts, k, new):
        params = SamplingParams(new, temperature=1.0)
        fns = {"hf": lambda: sum(len(r) for r in hf.generate(prompts, k, params).response_ids)}
        if engine is not None:
            raw_params = engine.sampling_params(k, params)
            raw_prompts = [{"prompt_token_ids": p} for p in prompts]
            fns["vllm"] = lambda: sum(len(r) for r in engine.generate(prompts, k, params).response_ids)
            llm = engine.llm
            fns["vllm-raw"] = lambda: sum(len(o.token_ids) for r in llm.generate(raw_prompts, raw_params,
                                                                                   use_tqdm=False) for o in r.outputs)
        return fns

    warm = sides([[5] * args.prompt_len], 2, 4)
    for name in args.sides:
        t0 = time.perf_counter()
        warm[name]()
        print(f"warm-up call {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    results = []
    for seqs in args.sequences:
        for new in args.new_tokens:
            k = 8
            prompts = torch.randint(2, args.vocab, (seqs // k, args.prompt_len), generator=g).tolist()
            fns = sides(prompts, k, new)
            rates: dict[str, list[float]] = {s: [] for s in args.sides}
            for r in range(args.rounds):
                order = args.sides[r % len(args.sides):] + args.sides[: r % len(args.sides)]
                for name in order:
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    n = fns[name]()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    assert n == seqs * new, f"{name} generated {n} tokens, expected {seqs * new}"
                    rates[name].append(n / dt)
                    print(f"  {seqs} seqs x {new} tokens, round {r + 1}, {name}: {n / dt:,.0f} tok/s ({dt:.2f} s)",
                          flush=True)
            results.append({"sequences": seqs, "new_tokens": new, "tokens_per_s": rates})
    print(f"load average after: {os.getloadavg()}")
    print()
    vllm_version = __import__("vllm").__version__ if uses_vllm else "(not used)"
    print(f"vLLM {vllm_version}, torch {torch.__version__}, device {args.device}, "
          f"dtype {args.dtype}, model hidden {args.hidden} x {args.layers} layers x {args.heads} heads, "
          f"vocab {args.vocab}; "
          f"{args.rounds} rounds; vLLM start-up {startup:.0f} s")
    print()
    head = " | ".join(f"{s} tok/s (median, range)" for s in args.sides)
    extra = " | vllm / hf | vllm / vllm-raw" if {"hf", "vllm", "vllm-raw"} <= set(args.sides) else ""
    print(f"| sequences | new tokens | {head}{extra} |")
    print("|---:|---:|" + "---:|" * (len(args.sides) + (2 if extra else 0)))
    for row in results:
        med = {s: statistics.median(v) for s, v in row["tokens_per_s"].items()}
        cells = " | ".join(f"{med[s]:,.0f} ({min(v):,.0f}-{max(v):,.0f})" for s, v in row["tokens_per_s"].items())
        ratio = f" | {med['vllm'] / med['hf']:.2f} | {med['vllm'] / med['vllm-raw']:.2f}" if extra else ""
        print(f"| {row['sequences']} | {row['new_tokens']} | {cells}{ratio} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "startup_s": startup, "results": results}, f, indent=1)


if __name__ == "__main__":  # vLLM starts worker processes with spawn
    main()
