"""Peak memory per rank of one policy update, for each way of holding the model.

A ~110M-parameter Llama is built from a config (no download) and takes one update exactly as
the trainer does it: the module from ``Parallel.trained`` (DDP/FSDP2 or plain), a forward
through ``response_logprobs``, ``backward``, gradient clipping and an AdamW step. Variants:

    full          full fine-tuning, 1 process
    fsdp2         full fine-tuning, FSDP2 over 2 ranks (torchrun-style processes, gloo/NCCL)
    lora          LoRA r=16 on every attention/MLP linear layer, 1 process
    lora_gc       LoRA + gradient checkpointing
    gae           full fine-tuning + the critic (value head on a copy of the backbone, its own AdamW)

Reported per rank: bytes of parameters, gradients and optimizer state held by the rank (local
shards under FSDP), the peak resident memory of the process above its baseline before the model
was built (CPU: ``ru_maxrss``), and on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/memory.py                      # CPU, float32, all variants
    python benchmarks/memory.py --device cuda --dtype bfloat16 --seq 1024 --batch 8

Each variant runs in fresh processes, so peaks do not leak from one into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": 1, "fsdp2": 2, "lora": 1, "lora_gc": 1, "gae": 1}


def build_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=4096, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> dict:
    import torch

    from reinforcepp.lm.distributed import init_distributed
    from reinforcepp.lm.logprobs import response_logprobs
    from reinforcepp.lm.models import ValueModel
    from reinforcepp.lm.parallel import Parallel

    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist = init_distributed(device.type)
    dtype = getattr(torch, args.dtype)
    par = Parallel(dist, device, fsdp=args.variant == "fsdp2", compute_dtype=dtype)
    import peft  # noqa: F401  (imported before the baseline: library code is not model memory)
    from transformers import LlamaForCausalLM  # noqa: F401

    baseline = rss_bytes()
    model = build_model(args.vocab, args.hidden, args.layers).to(device=device, dtype=par.master_dtype)
    n_params = sum(p.numel() for p in model.parameters())
    if args.variant.startswith("lora"):
        from reinforcepp.lm.lora import add_lora

        model = add_lora(model, rank=16, alpha=32, dropout=0.0)
    if args.variant == "lora_gc":
        from reinforcepp.lm.models import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    critic = ValueModel.from_causal_lm(model) if args.variant == "gae" else None
    train = par.trained(model)
    train_critic = par.trained(critic) if critic is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    copt = torch.optim.AdamW(critic.parameters(), lr=1e-5) if critic is not None else None
    gen = torch.Generator().manual_seed(1 + dist.rank)
    batch = args.batch // dist.world_size
    ids = torch.randint(4, args.vocab, (batch, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    t = args.seq // 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        logp = response_logprobs(train, ids, mask, t).logprobs
        (logp.mean() * par.loss_scale).backward()
        par.clip_grad_norm(params, 1.0)
        if critic is not None and train_critic is not None and copt is not None:
            values = train_critic(ids, mask, t)
            ((values**2).mean() * par.loss_scale).backward()
            par.clip_grad_norm(critic.parameters(), 1.0)
            copt.step()
        grad_bytes = local_bytes(p.grad for p in params if p.grad is not None)
        if critic is not None:
            grad_bytes += local_bytes(p.grad for p in critic.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if copt is not None:
            copt.zero_grad(set_to_none=True)
    all_params = list(model.parameters()) + (list(critic.parameters()) if critic else [])
    states = [
        v for o in (opt, copt) if o is not None for s in o.state.values() for v in s.values() if torch.is_tensor(v)
    ]
    out = {
        "variant": args.variant, "rank": dist.rank, "world_size": dist.world_size, "device": device.type,
        "dtype": args.dtype, "params": n_params, "param_bytes": local_bytes(all_params), "grad_bytes": grad_bytes,
        "optimizer_bytes": local_bytes(states),
        "peak_rss_above_baseline": rss_bytes() - baseline,
    }
    if device.type == "cuda":
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return out


def run_variant(variant: str, argv: list[str]) -> list[dict]:
    nproc = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for rank in range(nproc):
            dist_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc),
                        "RANK": str(rank), "LOCAL_RANK": str(rank)} if nproc > 1 else {}
            cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--out", f"{tmp}/{rank}.json", *argv]
            procs.append(subprocess.Popen(cmd, env={**env, **dist_env}))
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"variant {variant} failed (exit {p.returncode})")
        return [json.loads(Path(f"{tmp}/{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4, help="sequences per update (split over the ranks)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (the second half is the response)")
    parser.add_argument("--steps", type=int, default=2, help="updates (the optimizer state exists from the first)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args)))
        return
    shared = ("device", "dtype", "vocab", "hidden", "layers", "batch", "seq", "steps", "threads")
    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k in shared]
    rows = [row for v in args.variants.split(",") for row in run_variant(v, passthrough)]
    mib = 2**20
    header = (f"{'variant':8} {'rank':>4} {'params':>10} {'param MiB':>10} {'grad MiB':>9} {'optim MiB':>10} "
              f"{'sum MiB':>8} {'peak RSS+ MiB':>13}")
    print(header + ("  cuda max MiB" if args.device == "cuda" else ""))
    for r in rows:
        total = (r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]) / mib
        line = (f"{r['variant']:8} {r['rank']:>4} {r['params'] / 1e6:>9.1f}M {r['param_bytes'] / mib:>10.1f} "
                f"{r['grad_bytes'] / mib:>9.1f} {r['optimizer_bytes'] / mib:>10.1f} {total:>8.1f} "
                f"{r['peak_rss_above_baseline'] / mib:>13.1f}")
        if "cuda_max_allocated" in r:
            line += f"  {r['cuda_max_allocated'] / mib:>12.1f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
