"""What a remote reference costs: per-step time of a served vs a local reference on the built-in
task over loopback, and the reference server's tokens/s under 1, 4 and 16 concurrent clients.

    python benchmarks/remote_reference.py                      # defaults (~5 min on 2 loaded cores)
    python benchmarks/remote_reference.py --quick              # smoke run
    python benchmarks/remote_reference.py --out benchmarks/results/remote_reference.json

Part 1, per step. The built-in job's model and batch (``LMConfig.tiny``: the tiny Llama, hidden
128, 2 layers; 32 prompts x 8 samples = 256 responses of at most 8 tokens, ``micro_batch_size``
64, ``share_prompt`` on, one torch thread) without the warm start. Two trainers with the same
seed, one with the local reference (a frozen copy of the initial policy), one with
``ref_model=URL`` where the server (a subprocess, one torch thread) serves the same weights.
Rounds alternate the order (local first on even rounds, remote first on odd ones); each round
runs one full ``train_step()`` on each trainer and, on the local trainer's rollout, times the
reference pass alone (``batched_forward`` of the local model vs of the ``RemoteReference``) for
each remote setting of the grid (``remote_batch_size`` x ``remote_concurrency``). Median and
range over rounds.

Part 2, server throughput. A fresh server; ``C`` clients in flight (one ``RemoteClient`` with
``concurrency=C`` posting ``requests`` payloads of ``batch`` built-in-task responses each);
tokens/s = prompt + response tokens the server computed (``/info`` ``tokens_served``) / wall
time. Rounds alternate the order of ``C``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_server(model_dir: str, max_batch_tokens: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reinforcepp.cli", "serve", "reference", "--model", model_dir,
                             "--port", "0", "--threads", "1", "--max-batch-tokens", str(max_batch_tokens)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = line.rsplit(" on ", 1)[1].strip()
    from reinforcepp.remote.client import wait_until_up

    wait_until_up(url)
    return proc, url


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def per_step(args, url: str) -> dict:
    import torch

    from reinforcepp.lm.batch import collate
    from reinforcepp.lm.config import LMConfig
    from reinforcepp.lm.experience import batched_forward
    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model
    from reinforcepp.lm.trainer import Trainer
    from reinforcepp.remote import RemoteReference, RemoteSettings

    tmp = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    common = {"sft_steps": 0, "eval_every": 0, "progress": False, "tensorboard": False, "log_samples_every": 0,
              "total_steps": 10_000, "torch_threads": 1, "task": "reverse"}
    tok = build_char_tokenizer()
    local = Trainer(LMConfig.tiny(output_dir=str(tmp / "local"), **common), model=build_tiny_model(tok, seed=0),
                    tokenizer=tok)
    remote = Trainer(LMConfig.tiny(output_dir=str(tmp / "remote"), ref_model=url, **common),
                     model=build_tiny_model(tok, seed=0), tokenizer=tok)
    grid = [(b, c) for b in args.batch_sizes for c in args.concurrency]
    refs = {
        (b, c): RemoteReference(url, RemoteSettings(concurrency=c), temperature=local.config.temperature, batch_size=b)
        for b, c in grid
    }
    steps: dict[str, list[float]] = {"local": [], "remote": []}
    forward_phase: dict[str, list[float]] = {"local": [], "remote": []}
    ref_pass: dict[str, list[float]] = {"local": [], **{f"remote b={b} c={c}": [] for b, c in grid}}
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        order = [("local", local), ("remote", remote)] if r % 2 == 0 else [("remote", remote), ("local", local)]
        for name, trainer in order:
            t = time.perf_counter()
            m = trainer.train_step()
            if r:
                steps[name].append(time.perf_counter() - t)
                forward_phase[name].append(m["time/forward"])
        rollout = local.rollout()
        batch = collate(rollout.generation.prompt_ids, rollout.generation.response_ids, tok.pad_token_id)
        mb = local.config.micro_batch_size
        sides = [("local", local._logprob_fn(local.ref_model))]
        sides += [(f"remote b={b} c={c}", refs[(b, c)].response_logprobs) for b, c in grid]
        if r % 2:
            sides.reverse()
        for name, fn in sides:
            t = time.perf_counter()
            out = batched_forward(fn, batch, mb, torch.device("cpu"))
            if r:
                ref_pass[name].append(time.perf_counter() - t)
        tokens = int(batch.attention_mask.sum())
    return {
        "tokens_per_reference_pass": tokens,
        "responses_per_step": local.config.rollout_size,
        "train_step_s": {k: summary(v) for k, v in steps.items()},
        "time_forward_phase_s": {k: summary(v) for k, v in forward_phase.items()},
        "reference_pass_s": {k: summary(v) for k, v in ref_pass.items()},
        "last_output_shape": list(out.shape),
    }


def throughput(args, model_dir: str) -> dict:
    from reinforcepp.lm.tasks import build_char_tokenizer, get_task
    from reinforcepp.remote import RemoteClient, RemoteSettings

    proc, url = start_server(model_dir, args.max_batch_tokens)
    try:
        tok = build_char_tokenizer()
        rows = get_task("reverse").examples(args.batch * args.requests, seed=1)
        payloads: list[dict[str, Any]] = []
        for i in range(args.requests):
            part = rows[i * args.batch : (i + 1) * args.batch]
            payloads.append({
                "prompt_ids": [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in part],
                "response_ids": [
                    tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in part
                ],
                "temperature": 1.0,
            })
        info = RemoteClient(url)
        results: dict[int, list[float]] = {c: [] for c in args.clients}
        for r in range(args.rounds + 1):
            order = args.clients if r % 2 == 0 else list(reversed(args.clients))
            for c in order:
                client = RemoteClient(url, RemoteSettings(concurrency=c))
                before = info.get("/info")["tokens_served"]
                t = time.perf_counter()
                client.post_many("/logprobs", payloads)
                wall = time.perf_counter() - t
                served = info.get("/info")["tokens_served"] - before
                client.close()
                if r:
                    results[c].append(served / wall)
        first = payloads[0]
        return {"url": url, "batch": args.batch, "requests": args.requests, "max_batch_tokens": args.max_batch_tokens,
                "tokens_per_request": sum(len(p) + len(y) for p, y in zip(first["prompt_ids"], first["response_ids"])),
                "tokens_per_s": {str(c): summary(v) for c, v in results.items()}}
    finally:
        proc.kill()
        proc.wait()


def table(result: dict) -> str:
    def fmt(s: dict, unit: float = 1.0, digits: int = 3) -> str:
        return f"{s['median'] * unit:.{digits}f} [{s['min'] * unit:.{digits}f}, {s['max'] * unit:.{digits}f}]"

    p, srv = result["per_step"], result["server"]
    lines = [f"load average before/after: {result['load_average_before']} / {result['load_average_after']}  "
             f"(cpu_count {result['cpu_count']})",
             "", "| | median [min, max] s |", "|---|---|"]
    lines += [f"| train_step, {k} reference | {fmt(v)} |" for k, v in p["train_step_s"].items()]
    lines += [f"| time/forward phase, {k} reference | {fmt(v)} |" for k, v in p["time_forward_phase_s"].items()]
    lines += [f"| reference pass alone ({p['tokens_per_reference_pass']} tokens), {k} | {fmt(v)} |"
              for k, v in p["reference_pass_s"].items()]
    lines += ["", "| concurrent clients | server tokens/s, median [min, max] |", "|---|---|"]
    lines += [f"| {c} | {fmt(v, 1.0, 0)} |" for c, v in srv["tokens_per_s"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=16, help="responses per request in part 2")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement in part 2")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.batch_sizes, args.concurrency = 1, 8, [16], [4]
    import torch

    torch.set_num_threads(1)
    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

    model_dir = tempfile.mkdtemp(prefix="remote-bench-ref-")
    tok = build_char_tokenizer()
    build_tiny_model(tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    started = time.strftime("%H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    proc, url = start_server(model_dir, args.max_batch_tokens)
    try:
        part1 = per_step(args, url)
    finally:
        proc.kill()
        proc.wait()
    part2 = throughput(args, model_dir)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "started": started,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpu_count": os.cpu_count(),
              "per_step": part1, "server": part2}
    text = json.dumps(result, indent=1)
    print(table(result))
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
