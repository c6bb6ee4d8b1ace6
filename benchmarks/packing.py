"""The update's forward and backward, padded against packed, CPU time on a tiny model.

    python benchmarks/packing.py                                     # 8 prompts x 4 samples, answers up to 512 tokens
    python benchmarks/packing.py --budgets 1024 2048 --json benchmarks/results/packing_cpu.json
    python benchmarks/packing.py --bf16 --json benchmarks/results/packing_cpu_bf16.json   # the same grid, bf16 autocast
    python benchmarks/packing.py --quick                             # smoke run: 4 x 4, answers up to 128, 2 rounds

Estimated wall time on 2 idle cores: the default ~3 min, ``--bf16`` about the same (no AMX
here), ``--quick`` ~20 s.

A rollout of ``--prompts`` prompts (16 to 64 tokens) with ``--samples`` answers each, the answer
lengths drawn from a lognormal (median ``--median`` tokens, sigma ``--sigma``) and clipped to
``[1, --max-tokens]``. One pass of the update over it (forward with entropy, backward of a
policy-gradient-shaped loss, gradients accumulated) in four layouts:

* ``padded``: ``micro_batch_size`` rows per micro-batch, each row ``P + T`` wide (the rollout's
  longest prompt and answer), as the trainer runs ``response_logprobs`` today;
* ``padded_shared``: the same with ``share_prompt`` (each distinct prompt once, key/value cache);
* ``packed@B``: micro-batches of at most ``B`` real tokens (``plan_micro_batches``), each one row
  (``packed_response_logprobs``, sdpa with an explicit block-causal mask);
* ``packed_shared@B``: the same with a prompt's samples kept together and packed as one tree;
* ``packed_position_ids@B`` (first budget only): ``packed@B`` with no mask handed in, transformers
  splitting the row where the positions restart (``method="position_ids"``).

Reported: micro-batches, tokens computed and real, ``padding_fraction``, and the median [range]
CPU seconds of one pass over ``--rounds - 1`` timed rounds (the order rotated every round, the
first round a warm-up), one torch thread. All layouts must give the same log-probs (the largest
difference from ``padded`` is reported). ``--bf16`` runs every forward under bfloat16 autocast
over float32 weights, as the trainer's ``autocast=bfloat16`` does (log-probs then differ
between layouts by bfloat16 rounding).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Callable

import torch

from reinforcepp.lm.batch import PromptResponseBatch, collate
from reinforcepp.lm.logprobs import TokenLogprobs, response_logprobs
from reinforcepp.lm.micro_batches import (
    plan_micro_batches,
    prompt_groups,
    sequence_lengths,
    update_token_counts,
)
from reinforcepp.lm.packing import (
    packed_response_logprobs,
)
from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model


def rollout(args: argparse.Namespace, vocab: int, pad: int) -> PromptResponseBatch:
    g = torch.Generator().manual_seed(args.seed)
    prompts, answers = [], []
    lengths = torch.distributions.LogNormal(math.log(args.median), args.sigma)
    torch.manual_seed(args.seed)
    for _ in range(args.prompts):
        prompt = torch.randint(3, vocab, (int(torch.randint(16, 65, (1,), generator=g)),), generator=g).tolist()
        for _ in range(args.samples):
            n = int(lengths.sample().clamp(1, args.max_tokens))
            prompts.append(prompt)
            answers.append(torch.randint(3, vocab, (n,), generator=g).tolist())
    return collate(prompts, answers, pad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="answers per prompt")
    p.add_argument("--median", type=float, default=100.0, help="median answer length (lognormal)")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the answer lengths")
    p.add_argument("--max-tokens", type=int, default=512, help="answers are clipped to this length")
    p.add_argument("--micro-batch-size", type=int, default=8, help="rows per padded micro-batch")
    p.add_argument(
        "--budgets", type=int, nargs="+", default=[1024, 2048, 4096], help="micro_batch_tokens of the packed layouts"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast over the forwards (float32 weights)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 prompts x 4 samples, answers up to 128, budget 512, 2 rounds")
    args = p.parse_args()
    if args.quick:
        args.prompts, args.samples, args.median, args.max_tokens, args.budgets, args.rounds = 4, 4, 40.0, 128, [512], 2
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    model = build_tiny_model(
        tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64, context=args.max_tokens + 80
    )
    batch = rollout(args, len(tok), tok.pad_token_id)
    t = batch.response_length
    n = batch.input_ids.shape[0]
    prompt_len, answer_len = sequence_lengths(batch.attention_mask, t)
    groups = prompt_groups(batch.input_ids, t)
    advantages = torch.randn(n, generator=torch.Generator().manual_seed(1))[:, None] * batch.response_mask

    def update(forward: Callable[..., TokenLogprobs], micro_batches: list[list[int]], **kw) -> torch.Tensor:
        logprobs = torch.zeros(n, t)
        for rows in micro_batches:
            index = torch.tensor(rows)
            part = batch.select(index)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = forward(model, part.input_ids, part.attention_mask, t, with_entropy=True, **kw)
            assert out.entropy is not None
            m = part.response_mask
            loss = -(out.logprobs * advantages[index]).sum() / n - 0.01 * (out.entropy * m).sum() / m.sum()
            loss.backward()
            logprobs[index] = out.logprobs.detach() * m
        return logprobs

    rows = [list(range(s, min(n, s + args.micro_batch_size))) for s in range(0, n, args.micro_batch_size)]
    variants: dict[str, tuple[Callable[[], torch.Tensor], list[list[int]], bool, bool]] = {
        "padded": (lambda: update(response_logprobs, rows), rows, False, False),
        "padded_shared": (lambda: update(response_logprobs, rows, share_prompt=True), rows, False, True),
    }
    for budget in args.budgets:
        plain = plan_micro_batches(prompt_len, answer_len, budget)
        tree = plan_micro_batches(prompt_len, answer_len, budget, groups=groups)
        variants[f"packed@{budget}"] = (lambda plan=plain: update(packed_response_logprobs, plan), plain, True, False)
        variants[f"packed_shared@{budget}"] = (
            lambda plan=tree: update(packed_response_logprobs, plan, share_prompt=True),
            tree,
            True,
            True,
        )
    first = plan_micro_batches(prompt_len, answer_len, args.budgets[0])  # transformers' own packed-row detection
    variants[f"packed_position_ids@{args.budgets[0]}"] = (
        lambda: update(packed_response_logprobs, first, method="position_ids"),
        first,
        True,
        False,
    )
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    logprobs: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            model.zero_grad(set_to_none=True)
            t0 = time.process_time()
            logprobs[name] = variants[name][0]()
            if r:
                times[name].append(time.process_time() - t0)
    worst = max(float((logprobs[k] - logprobs["padded"]).abs().max()) for k in names)
    results = []
    for name in names:
        _, plan, packed, shared = variants[name]
        computed, real = update_token_counts(
            batch.attention_mask, t, plan, packed=packed, groups=groups if shared else None
        )
        ts = times[name]
        results.append(
            {
                "layout": name,
                "micro_batches": len(plan),
                "computed_tokens": computed,
                "real_tokens": real,
                "padding_fraction": round(1 - real / computed, 4),
                "seconds_median": round(statistics.median(ts), 3),
                "seconds_min": round(min(ts), 3),
                "seconds_max": round(max(ts), 3),
            }
        )
    millions = sum(q.numel() for q in model.parameters()) / 1e6
    report = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, CPU time",
        "precision": "bfloat16 autocast over float32 weights" if args.bf16 else "float32",
        "model": f"Llama {args.layers} layers, hidden {args.hidden}, {millions:.1f}M parameters, sdpa",
        "rollout": {
            "responses": n,
            "prompt_tokens": [min(prompt_len), max(prompt_len)],
            "answer_tokens_median": statistics.median(answer_len),
            "answer_tokens_mean": round(statistics.mean(answer_len), 1),
            "answer_tokens_max": max(answer_len),
            "width": batch.input_ids.shape[1],
        },
        "max_abs_logprob_difference_vs_padded": worst,
        "timed_rounds": args.rounds - 1,
        "results": results,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
