"""What rollout servers cost: a training step with 1 and 2 rollout servers against the colocated
engine, the bytes and seconds of a weight push per million parameters, the push under FSDP, and
the per-prompt seeds' cost in the hf engine's decoding loop.

    python benchmarks/rollout_service.py                 # the full run (a quiet machine: ~15 min)
    python benchmarks/rollout_service.py --quick         # smoke run (~2 min)
    python benchmarks/rollout_service.py --out benchmarks/results/rollout_service.json

On one machine this measures the **overhead** of the service (HTTP, JSON, the split over servers,
the push), not its scale: the servers share the trainer's cores, so two servers cannot be faster
than one here. On separate machines (GPUs) generation runs beside the update instead.

Part 1, per step. The built-in job's model and batch (``LMConfig.tiny``, task ``reverse``: the
tiny Llama, hidden 128, 2 layers; 32 prompts x 8 samples of at most 8 tokens; one torch thread)
without the warm start: a trainer with the colocated ``hf`` engine, one with one rollout server,
one with two (``reinforcepp serve rollout`` subprocesses, one torch thread each, holding the
initial weights). Rounds alternate the order; each round runs one ``train_step()`` of each
(rollout, experience, update, and for the servers the push of the new weights). Median and range
of the step time, of ``time/generate`` and of ``time/sync`` (the push).

Part 2, weight push. Tiny Llamas of growing width; one server; ``sync_weights`` of the whole
model (float32 and, to a ``--dtype bfloat16`` server, bfloat16 on the wire): bytes sent and
seconds, per million parameters.

Part 3, push under FSDP. Two gloo ranks hold the widest model of part 2 sharded with
``fully_shard`` (per decoder layer, then the root); every rank gathers it tensor by tensor
(``stream_full_weights``) and rank 0 pushes: seconds per million parameters, against the same
push from one unsharded process (part 2).

Part 4, seeds. ``SharedPromptSampler.generate`` of 32 prompts x 8 samples x 32 tokens (EOS never
sampled) unseeded (one ``torch.multinomial`` per token) and seeded (one generator per prompt, one
``multinomial`` per prompt per token).
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


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def start_server(model_dir: str, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reinforcepp.cli",
            "serve",
            "rollout",
            "--model",
            model_dir,
            "--port",
            "0",
            "--threads",
            "1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = line.rsplit(" on ", 1)[1].strip()
    from reinforcepp.remote.client import wait_until_up

    wait_until_up(url)
    return proc, url


def tiny(hidden: int, layers: int, seed: int = 0):
    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    return tok, build_tiny_model(tok, hidden_size=hidden, num_layers=layers, num_heads=4, seed=seed)


def save(model, tok) -> str:
    folder = tempfile.mkdtemp(prefix="rollout-bench-model-")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- part 1
def per_step(args) -> dict:
    from reinforcepp.lm.config import LMConfig
    from reinforcepp.lm.trainer import Trainer

    tok, model = tiny(128, 2)
    folder = save(model, tok)
    servers = [start_server(folder) for _ in range(3)]  # one run per server: the 1-server trainer has its own
    try:
        tmp = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
        common = {
            "sft_steps": 0,
            "eval_every": 0,
            "progress": False,
            "tensorboard": False,
            "log_samples_every": 0,
            "total_steps": 10_000,
            "torch_threads": 1,
            "task": "reverse",
            "prompts_per_step": args.prompts,
            "samples_per_prompt": 8,
            "micro_batch_size": 8 * args.prompts,
        }
        sides = {
            "colocated hf": {},
            "1 server": {"rollout_urls": [servers[0][1]]},
            "2 servers": {"rollout_urls": [u for _, u in servers[1:]]},
        }
        trainers = {}
        for name, extra in sides.items():
            tok, model = tiny(128, 2)
            trainers[name] = Trainer(
                LMConfig.tiny(output_dir=str(tmp / name.replace(" ", "_")), **common, **extra),
                model=model,
                tokenizer=tok,
            )
        times: dict[str, dict[str, list[float]]] = {n: {"step": [], "generate": [], "sync": []} for n in sides}
        names = list(sides)
        for r in range(args.rounds + 1):  # round 0 warms up
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                t = trainers[name]
                start = time.perf_counter()
                metrics = t.train_step()
                if r:
                    times[name]["step"].append(time.perf_counter() - start)
                    times[name]["generate"].append(metrics.get("time/generate", 0.0))
                    times[name]["sync"].append(metrics.get("time/sync", 0.0))
        return {n: {k: summary(v) for k, v in d.items()} for n, d in times.items()}
    finally:
        for proc, _ in servers:
            proc.kill()


# --------------------------------------------------------------------------- part 2
def push(args) -> list[dict]:
    from reinforcepp.engines.remote import RemoteEngine
    from reinforcepp.lm.config import LMConfig

    rows = []
    for hidden, layers in args.widths:
        tok, model = tiny(hidden, layers)
        params = sum(p.numel() for p in model.parameters())
        folder = save(model, tok)
        for dtype in ("float32", "bfloat16"):
            proc, url = start_server(folder, "--dtype", dtype, "--keep-versions", "2", "--max-request-mb", "64")
            try:
                engine = RemoteEngine(model, tok, config=LMConfig.from_dict({"rollout_urls": [url]}))
                seconds, sent = [], 0.0
                for v in range(args.pushes + 1):
                    engine.sync_weights(model, version=v)
                    if v:
                        seconds.append(engine.pool.last_push["seconds"])
                        sent = engine.pool.last_push["bytes"]
                engine.close()
            finally:
                proc.kill()
            m = params / 1e6
            rows.append(
                {
                    "hidden": hidden,
                    "layers": layers,
                    "params_m": m,
                    "wire": dtype,
                    "bytes": sent,
                    "seconds": summary(seconds),
                    "mb_per_mparam": sent / 1e6 / m,
                    "s_per_mparam": statistics.median(seconds) / m,
                }
            )
    return rows


# --------------------------------------------------------------------------- part 3
def _fsdp_rank(rank: int, world: int, port: int, url: str, hidden: int, layers: int, pushes: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from reinforcepp.engines.remote import RemoteEngine
    from reinforcepp.lm.config import LMConfig
    from reinforcepp.lm.distributed import DistContext
    from reinforcepp.lm.parallel import Parallel, stream_full_weights

    tok, model = tiny(hidden, layers)
    parallel = Parallel(DistContext(rank, world), torch.device("cpu"), fsdp=True)
    engine = RemoteEngine(model, tok, config=LMConfig.from_dict({"rollout_urls": [url]}))
    sharded = parallel.trained(model)
    seconds = []
    for v in range(pushes + 1):
        dist.barrier()
        start = time.perf_counter()
        engine.sync_weights(sharded, lambda: stream_full_weights(sharded), version=v)
        if v:
            seconds.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "bytes": engine.pool.last_push["bytes"]}))
    engine.close()
    dist.barrier()
    dist.destroy_process_group()


def fsdp_push(args) -> dict:
    import torch.multiprocessing as mp

    from tests.remote.servers import free_port

    hidden, layers = args.widths[-1]
    tok, model = tiny(hidden, layers)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    proc, url = start_server(save(model, tok), "--keep-versions", "2", "--max-request-mb", "64")
    out = tempfile.mktemp(suffix=".json")
    try:
        mp.start_processes(
            _fsdp_rank, args=(2, free_port(), url, hidden, layers, args.pushes, out), nprocs=2, start_method="spawn"
        )
    finally:
        proc.kill()
    got = json.loads(Path(out).read_text())
    return {
        "hidden": hidden,
        "layers": layers,
        "params_m": params,
        "ranks": 2,
        "bytes": got["bytes"],
        "seconds": summary(got["seconds"]),
        "s_per_mparam": statistics.median(got["seconds"]) / params,
    }


# --------------------------------------------------------------------------- part 4
def seeds(args) -> dict:
    import torch

    from reinforcepp.engines import SamplingParams, SharedPromptSampler

    torch.set_num_threads(1)
    from types import SimpleNamespace

    tok, model = tiny(128, 2)
    model.eval()
    never = SimpleNamespace(
        eos_token_id=model.config.vocab_size, pad_token_id=tok.pad_token_id
    )  # no EOS: every call decodes 32 tokens
    engine = SharedPromptSampler(model, never)
    prompts = [tok(f"rev {'abcdefgh'[: 1 + i % 8]}=", add_special_tokens=False)["input_ids"] for i in range(32)]
    out: dict[str, list[float]] = {"unseeded": [], "seeded": []}
    for r in range(args.rounds + 1):
        for name in ["unseeded", "seeded"] if r % 2 == 0 else ["seeded", "unseeded"]:
            params = SamplingParams(32, seed=None if name == "unseeded" else r)
            start = time.perf_counter()
            engine.generate(prompts, 8, params)
            if r:
                out[name].append(time.perf_counter() - start)
    return {k: summary(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, smaller models")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.rounds = 3 if args.quick else 10
    args.prompts = 8 if args.quick else 32
    args.pushes = 2 if args.quick else 5
    args.widths = [(128, 2), (256, 4)] if args.quick else [(128, 2), (512, 4), (1024, 8)]
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick}
    results["seeds"] = seeds(args)
    results["step"] = per_step(args)
    results["push"] = push(args)
    results["fsdp_push"] = fsdp_push(args)
    print(json.dumps(results, indent=1))
    print(
        "\nstep (median s): "
        + ", ".join(
            f"{n} {v['step']['median']:.3f} (generate {v['generate']['median']:.3f}, push {v['sync']['median']:.3f})"
            for n, v in results["step"].items()
        )
    )
    for row in results["push"]:
        print(
            f"push {row['params_m']:.2f}M params, {row['wire']}: {row['mb_per_mparam']:.2f} MB "
            f"and {row['s_per_mparam']:.3f} s per M params"
        )
    f = results["fsdp_push"]
    print(f"push under FSDP ({f['ranks']} ranks, {f['params_m']:.2f}M params): {f['s_per_mparam']:.3f} s per M params")
    s = results["seeds"]
    print(f"hf decode, 32x8x32 tokens: unseeded {s['unseeded']['median']:.3f} s, seeded {s['seeded']['median']:.3f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
