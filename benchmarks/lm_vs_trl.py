"""Step time (wall and CPU), peak memory and reward: TRL's ``GRPOTrainer`` vs ours, over a grid.

    pip install -e '.[bench]'                    # trl, accelerate, psutil (once)
    python benchmarks/lm_vs_trl.py --quick       # smoke run: first cell, 2 steps, 1 round (~3 min)
    python benchmarks/lm_vs_trl.py --out benchmarks/results/lm_vs_trl_grid.json   # the default grid, ~65 min
    python benchmarks/lm_vs_trl.py --bf16 --out benchmarks/results/lm_vs_trl_bf16.json         # the same, bf16, ~60 min
    python benchmarks/lm_vs_trl.py --compiled --out benchmarks/results/lm_vs_trl_compile.json  # ~70 min
    python benchmarks/lm_vs_trl.py --cell "hidden=512 layers=8 heads=8 prompts=64 samples=8 tokens=256 warm=0 eos=0"
    python benchmarks/lm_vs_trl.py --gradient-checkpointing   # on on both sides
    python benchmarks/lm_vs_trl.py --adamw for-loop            # another AdamW implementation, on every side

Wall times estimated for 2 idle cores (the slowest cells: the 256-token and long-tail ones,
~10 and ~20 min). ``--log`` (default: ``--out`` with ``.log``) keeps a copy of the output.

Fair by construction: the same precision (float32, or ``--bf16`` autocast on both), the same
memory setting (gradient checkpointing off on both unless ``--gradient-checkpointing``; TRL's own
default is on, ours off), the same optimizer implementation (``--adamw``), the same work per
step and the same timed phases, alternating rounds, and ratios reported per cell as the median
and range over rounds of the same-round ratio, by wall clock and by CPU time
(``time.process_time`` of the worker: on a shared machine the steadier one), then the median and
range over the grid's cells. The load average is printed at the start, per run and at the end.

What is compared (one script run, CPU, no Hub access):

* **One starting point.** Per cell a ``prepare`` worker builds the built-in tiny Llama
  (``build_tiny_model``, one seed) and the char tokenizer, warm-starts it with ``sft_train`` on
  the ``reverse`` task (so the rewards are not all zero; ``warm=0`` cells keep the random init),
  and saves both with ``save_pretrained`` into a temporary directory. Every run loads its policy
  from that directory, so all start from identical weights.
* **The sides, each run in its own fresh subprocess** (``--worker``), alternating round by round
  (the order rotated every round so that drift in the machine load does not favour one side):
  ``trl`` (TRL ``GRPOTrainer``, its defaults unless they would make the comparison unequal; the
  JSON's ``settings``), ``grpo`` (ours, ``estimator=grpo`` matched to TRL's defaults: no KL / no
  reference model, group std scaling, token-mean loss over the whole batch, one iteration),
  ``reinforce_pp`` (ours with its own defaults: KL k1 in the reward with beta =
  ``--rpp-kl-coef``, global whitening), and ``grpo`` with one change each: ``grpo_noshare``
  (``share_prompt=false``: the ablation of the shared prompt), ``grpo_async``
  (``async_rollouts=1``: the next rollout is generated on a second core during the update; read
  its wall clock, its CPU time spans two threads), ``grpo_packed`` (``micro_batch_tokens``
  ``--packed-tokens`` and ``pack_sequences=true``). ``--compiled`` runs ``trl``,
  ``trl_compiled`` (TRL's ``torch_compile=True``), ``grpo`` and ``grpo_compiled``
  (``torch_compile=all``); a run's median step leaves its compiling first step out.
* **Same work per step:** ``prompts x samples`` completions of at most ``max_new_tokens``
  tokens, temperature 1, one optimizer step per rollout (AdamW, constant learning rate,
  gradient-norm clip 1.0, no weight decay), one torch thread (``--threads``).
* **Same AdamW:** TRL's default ``optim`` (``adamw_torch_fused``) is ``torch.optim.AdamW`` with
  ``fused=True``; ours builds ``torch.optim.AdamW`` with neither flag, which on a CPU is the
  single-tensor for-loop (torch picks ``foreach`` only for CUDA-like devices). ``--adamw``
  (default ``fused``) sets the same implementation on every side before its first step (the
  ``fused``/``foreach`` flags of the param groups, which torch reads at every step); each run
  records the flags it ran with (JSON ``optimizer``).
* **Timing, the same window on both sides:** ours around ``Trainer.train_step()``: fetching the
  step's prompts, generation, scoring, forward, backward, optimizer step, engine sync, the
  step's metrics and their JSONL line. TRL from the start of the ``Trainer``'s fetch of the
  step's batch (``get_batch_samples``, wrapped) to the end of its logging
  (``_maybe_log_save_evaluate``, wrapped): the fetch, generation, scoring, forward, backward,
  clipping, optimizer and scheduler steps, callbacks and the step's log. (Before, TRL was timed
  from ``on_step_begin`` to ``on_step_end``, which leaves the fetch and the logging out; that
  window is still recorded per step as ``trl/inner_s``.) Process start, model loading and
  evaluation are not timed. Completion tokens per second = generated completion tokens (EOS
  included) / step time, summed over all steps.
* **Cells** (``GRID``; ``--cell`` for others): model size, batch, answer length, prompt length;
  ``eos=0`` full-length cells (the saved tokenizer's EOS id is one the model cannot produce, so
  every response on every side runs to ``tokens``), and a long-tail cell: the random init
  samples EOS at a roughly constant rate per token, so answer lengths are roughly geometric
  (mean ~70, the longest of 64 near 400 here) up to ``max_new_tokens=512``. Both sides sample
  from the same weights with their ordinary settings, so nothing side-specific shapes the
  lengths (per-prompt length limits or a length reward would need settings only one side has).
  Every cell is labelled by its measured mean answer length (TRL's and the range of ours) and
  the longest answer.
* **Memory:** the peak resident set of each worker process (``VmHWM`` of ``/proc/self/status``,
  read by the worker at its end: the high-water mark of that process's own address space,
  imports, model loading and training included). The parent also reports ``ru_maxrss`` from
  ``os.wait4`` for each child as a cross-check (on Linux that value can include the parent's
  resident set at the time of the fork; the parent stays small for that reason).
* **Reward:** the mean ``char_match`` reward of each step's rollout (TRL's logged ``reward``;
  our ``reward/mean``). "Final reward" = mean over the last ``--final-window`` steps and over rounds.

Writes the tables to stdout and ``--log``, ``--out`` (JSON) and a PNG of the reward curves next to it.
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

SIDES = ("trl", "trl_compiled", "grpo", "reinforce_pp", "grpo_compiled", "grpo_noshare", "grpo_async", "grpo_packed")
DEFAULT_SIDES = ["trl", "grpo", "reinforce_pp", "grpo_noshare", "grpo_async", "grpo_packed"]
COMPILED_SIDES = ["trl", "trl_compiled", "grpo", "grpo_compiled"]
LABELS = {"trl": "TRL GRPOTrainer", "trl_compiled": "TRL compiled", "grpo": "ours grpo",
          "reinforce_pp": "ours reinforce_pp", "grpo_compiled": "ours grpo compiled",
          "grpo_noshare": "ours grpo share_prompt=false",
          "grpo_async": "ours grpo async_rollouts=1", "grpo_packed": "ours grpo packed"}
ADAMW = ("fused", "foreach", "for-loop")


# ---------------------------------------------------------------------------------------- helpers
class Tee:
    """Writes to the terminal and to the log file both."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def proc_status_kib(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM`` = peak RSS, ``VmRSS`` = current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def set_adamw(optimizer, impl: str) -> dict:
    """Make ``optimizer`` (a ``torch.optim.AdamW``, or transformers' wrapper of one) run the
    ``impl`` implementation (``fused``, ``foreach`` or ``for-loop``, torch's single-tensor loop),
    before its first step; returns the flags it now has. torch reads them per step from the
    param groups; ``AdamW(fused=True)`` also marks the optimizer as supporting a ``GradScaler``
    (unused here)."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = impl == "fused", impl == "foreach"
    inner = getattr(optimizer, "optimizer", optimizer)
    if impl == "fused":
        inner._step_supports_amp_scaling = True
    return adamw_flags(optimizer)


def adamw_flags(optimizer) -> dict:
    group = optimizer.param_groups[0]
    return {"class": type(getattr(optimizer, "optimizer", optimizer)).__name__, "fused": group.get("fused"),
            "foreach": group.get("foreach")}


def task_rows(n: int, seed: int, prompt_extra: int = 0) -> list[dict]:
    """The ``reverse`` task; ``prompt_extra > 0`` puts that many characters of (seeded, random)
    context before each prompt: a long prompt that the answer does not depend on."""
    import random

    from reinforcepp.lm.tasks import get_task

    rows = get_task("reverse").examples(n, seed)
    if prompt_extra:
        rng = random.Random(seed + 1)
        for r in rows:
            context = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(prompt_extra))
            r["prompt"] = "note " + context + ". " + r["prompt"]
    return rows


def trl_settings(spec: dict, side: str = "trl") -> dict:
    """Every GRPOConfig argument we set (the rest are TRL's defaults). ``trl_compiled``: TRL's
    ``torch_compile=True`` (transformers compiles the model through accelerate)."""
    n = spec["prompts"] * spec["samples"]
    return dict(torch_compile=side == "trl_compiled",
        use_cpu=True, report_to="none", bf16=spec["bf16"], fp16=False,
        # the same memory-saving setting on both sides (TRL's default is True, ours False)
        gradient_checkpointing=spec["gradient_checkpointing"],
        # TRL counts per_device_train_batch_size in completions; generation_batch_size defaults to
        # per_device_train_batch_size * num_processes * steps_per_generation
        # (= gradient_accumulation_steps), so one generation of prompts x samples completions feeds
        # exactly one optimizer step.
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=spec["samples"],
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=spec["steps"], logging_steps=1, save_strategy="no", seed=spec["seed"],
        # TRL defaults, written out so the output states them:
        beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1, epsilon=0.2,
        remove_unused_columns=False, shuffle_dataset=True, disable_tqdm=True, dataloader_num_workers=0,
    )


def ours_settings(spec: dict, side: str) -> dict:
    """Every LMConfig field we set (the rest are our defaults). The ``grpo_*`` sides are ``grpo``
    with one change: ``grpo_compiled`` ``torch_compile=all`` (update and decoding step compiled);
    ``grpo_noshare`` ``share_prompt=false`` (every sample's prompt computed again in the forward
    passes, as TRL does); ``grpo_async`` ``async_rollouts=1`` (a producer thread generates the next
    rollout during the update: two cores busy, one torch thread each; the off-policy correction at
    its default, truncate at 2); ``grpo_packed`` ``micro_batch_tokens`` (``--packed-tokens``, raised
    to the longest sequence the cell can make) and ``pack_sequences=true``."""
    estimator = "grpo" if side.startswith("grpo") else side
    n = spec["prompts"] * spec["samples"]
    common = dict(
        model=spec["model_dir"], dtype="float32", device="cpu", torch_threads=spec["threads"], estimator=estimator,
        gradient_checkpointing=spec["gradient_checkpointing"], share_prompt=not spec["gradient_checkpointing"],
        # TRL's bf16=True on CPU is bfloat16 autocast over float32 weights too
        autocast="bfloat16" if spec["bf16"] else "off",
        prompts_per_step=spec["prompts"], samples_per_prompt=spec["samples"], mini_batch_size=n, micro_batch_size=n,
        epochs=1, max_new_tokens=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        lr=spec["lr"], lr_schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        eps_low=0.2, eps_high=0.2, total_steps=spec["steps"], seed=spec["seed"], eval_every=0, log_samples_every=0,
        tensorboard=False, progress=False,
    )
    if estimator == "grpo":  # like-for-like with TRL's defaults: beta=0 (no reference model), token-mean loss
        common.update(kl_placement="none", loss_agg="token-mean")
        if side == "grpo_compiled":
            common.update(torch_compile="all")
        elif side == "grpo_noshare":
            common.update(share_prompt=False)
        elif side == "grpo_async":
            common.update(async_rollouts=1)
        elif side == "grpo_packed":
            longest = spec.get("longest_prompt_tokens", 0) + spec["max_new_tokens"]
            common.update(micro_batch_tokens=max(spec["packed_tokens"], longest), pack_sequences=True)
    elif spec["rpp_kl_coef"] > 0:  # reinforce_pp's own defaults: k1 KL in the reward
        common.update(kl_placement="reward", kl_estimator="k1", kl_coef=spec["rpp_kl_coef"], loss_agg="token-mean")
    else:
        common.update(kl_placement="none", loss_agg="token-mean")
    return common


# ---------------------------------------------------------------------------------------- workers
def worker_prepare(spec: dict) -> dict:
    """Build the tiny model from one seed, SFT warm start, save model + tokenizer."""
    limit_threads(spec["threads"])
    import torch

    from reinforcepp.lm.sft import sft_train
    from reinforcepp.lm.tasks import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    rows = task_rows(spec["train_size"], spec["seed"], spec["prompt_extra"])
    # room for the longest prompt plus the answer (long-prompt cells exceed the default 64)
    longest = max(len(tok(r["prompt"])["input_ids"]) for r in rows)
    context = max(64, 32 * -(-(longest + spec["max_new_tokens"]) // 32))
    model = build_tiny_model(tok, hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                             num_heads=spec["num_heads"], seed=spec["seed"], context=context)
    t0 = time.perf_counter()
    losses = []
    if spec["sft_steps"]:
        losses = sft_train(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows],
                           steps=spec["sft_steps"], batch_size=32, lr=3e-3, seed=spec["seed"])
    if spec.get("no_eos"):
        # An EOS id past the model's vocabulary: no side can sample it, so every response runs to
        # max_new_tokens on both sides and the cell times exactly prompts x samples x tokens.
        tok.add_special_tokens({"eos_token": "<no-eos>"})
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
        assert tok.eos_token_id >= model.config.vocab_size
    model.save_pretrained(spec["model_dir"], safe_serialization=True)
    tok.save_pretrained(spec["model_dir"])
    return {"sft_seconds": time.perf_counter() - t0, "sft_loss_first": losses[0] if losses else None,
            "sft_loss_last": losses[-1] if losses else None,
            "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
            "longest_prompt_tokens": longest}


def worker_trl(spec: dict, side: str = "trl") -> dict:
    limit_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reinforcepp.lm.tasks import char_match

    class StepLog(TrainerCallback):
        """TRL's own step window (``on_step_begin`` -> ``on_step_end``, kept as a cross-check) and its logs."""

        def __init__(self) -> None:
            self.inner: list[tuple[float, float]] = []
            self.logs: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.inner.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    tok.padding_side = "left"
    args = GRPOConfig(output_dir=spec["run_dir"], **trl_settings(spec, side))
    callback = StepLog()
    data = Dataset.from_list(task_rows(spec["train_size"], spec["data_seed"], spec["prompt_extra"]))
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=[char_match], args=args, train_dataset=data,
                          processing_class=tok, callbacks=[callback])
    # The timed window of a step, as ours (train_step: the prompts' fetch, generation, scoring,
    # forward, backward, optimizer step, logging): from the start of the Trainer's fetch of the
    # step's batch (get_batch_samples) to the end of its logging (_maybe_log_save_evaluate).
    windows: list[tuple[float, float]] = []
    opened: list[tuple[float, float]] = []
    optimizer_flags: dict = {}
    fetch, log_step = trainer.get_batch_samples, trainer._maybe_log_save_evaluate
    create_optimizer = trainer.create_optimizer

    def timed_fetch(*a, **k):
        opened.append((time.perf_counter(), time.process_time()))
        return fetch(*a, **k)

    def timed_log(*a, **k):
        out = log_step(*a, **k)
        if opened:
            t0, c0 = opened.pop()
            windows.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    def adamw(*a, **k):
        optimizer = create_optimizer(*a, **k)
        optimizer_flags.update(set_adamw(optimizer, spec["adamw"]))
        return optimizer

    trainer.get_batch_samples, trainer._maybe_log_save_evaluate = timed_fetch, timed_log
    trainer.create_optimizer = adamw
    rss_setup = proc_status_kib("VmRSS")
    trainer.train()
    n = spec["prompts"] * spec["samples"]
    steps = []
    for (dt, cpu), (inner, inner_cpu), logs in zip(windows, callback.inner, callback.logs):
        length = logs["completions/mean_length"]
        steps.append({"time": dt, "cpu": cpu, "reward": logs["reward"], "tokens": length * n, "length_mean": length,
                      "length_max": logs.get("completions/max_length"), "trl/inner_s": inner,
                      "trl/inner_cpu_s": inner_cpu, "trl/step_time": logs.get("step_time")})  # TRL's own timer
    return {"steps": steps, "rss_setup_kib": rss_setup,
            "logged_keys": sorted(callback.logs[0]) if callback.logs else [],
            "optimizer": {**optimizer_flags, "trl_optim": str(args.optim)}, "torch_compile": bool(args.torch_compile)}


def start_producer(trainer) -> None:
    """What ``Trainer.train()`` does before its first step (this script calls ``train_step()``
    itself to time each step; with ``async_rollouts`` and no producer started it would wait forever)."""
    if trainer.producer is not None:
        trainer.producer.publish(trainer.step, trainer.models.weights)
        trainer.producer.start()


def worker_ours(spec: dict, side: str) -> dict:
    limit_threads(spec["threads"])
    from datasets import Dataset

    from reinforcepp.lm import LMConfig, Trainer
    from reinforcepp.lm.tasks import char_match

    config = LMConfig.from_dict({**ours_settings(spec, side), "output_dir": spec["run_dir"]})
    rows = task_rows(spec["train_size"], spec["data_seed"], spec["prompt_extra"])
    trainer = Trainer(config, reward_funcs=[char_match], train_dataset=Dataset.from_list(rows))
    optimizer_flags = set_adamw(trainer.optimizer, spec["adamw"])
    rss_setup = proc_status_kib("VmRSS")
    steps = []
    start_producer(trainer)
    try:
        for _ in range(config.total_steps):
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainer.train_step()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps.append({"time": dt, "cpu": cpu, "reward": m["reward/mean"], "tokens": m["response/tokens"],
                          "length_mean": m["response/length_mean"], "length_max": m.get("response/length_max"),
                          "padding_fraction": m.get("update/padding_fraction"),
                          **{k: v for k, v in m.items() if k.startswith(("time/", "producer/"))}})
    finally:
        if trainer.producer is not None:
            trainer.producer.close()
    trainer.logger.close()
    return {"steps": steps, "rss_setup_kib": rss_setup, "optimizer": optimizer_flags}


def worker_main(role: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if role == "prepare":
        out = worker_prepare(spec)
    elif role.startswith("trl"):
        out = worker_trl(spec, role)
    else:
        out = worker_ours(spec, role)
    out["peak_rss_kib"] = proc_status_kib("VmHWM")
    Path(result_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------- parent
def launch(role: str, spec: dict, workdir: Path, tag: str) -> dict:
    """Run one worker in a fresh interpreter; return its result plus wall time and wait4's ru_maxrss."""
    spec_path, result_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    log_path = workdir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", PYTHONWARNINGS="ignore")
    load = os.getloadavg()  # before the run starts (it used to be read after it ended)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", role, str(spec_path), str(result_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"worker {role} ({tag}) failed with exit code {proc.returncode}:\n{tail}")
    out = json.loads(result_path.read_text())
    out.update(wall_s=wall, wait4_maxrss_kib=usage.ru_maxrss, load_at_start=load)
    return out


def summarise(runs: list[dict], final_window: int) -> dict:
    times = [s["time"] for r in runs for s in r["steps"]]
    tokens = sum(s["tokens"] for r in runs for s in r["steps"])
    steps = min(len(r["steps"]) for r in runs)
    curve = [statistics.mean(r["steps"][i]["reward"] for r in runs) for i in range(steps)]
    w = min(final_window, steps)
    out = {
        "median_step_s": statistics.median(times),
        "median_step_s_per_round": [statistics.median(s["time"] for s in r["steps"]) for r in runs],
        "first_step_s_per_round": [r["steps"][0]["time"] for r in runs],  # with torch_compile: the compilation
        "median_step_cpu_s": statistics.median(s["cpu"] for r in runs for s in r["steps"]),
        "median_step_cpu_s_per_round": [statistics.median(s["cpu"] for s in r["steps"]) for r in runs],
        "tokens_per_s": tokens / sum(times),
        "peak_rss_mib": max(r["peak_rss_kib"] for r in runs) / 1024,
        "peak_rss_mib_per_round": [r["peak_rss_kib"] / 1024 for r in runs],
        "rss_after_setup_mib": max(r["rss_setup_kib"] for r in runs) / 1024,
        "rss_training_increase_mib": max(r["peak_rss_kib"] - r["rss_setup_kib"] for r in runs) / 1024,
        "wait4_maxrss_mib": max(r["wait4_maxrss_kib"] for r in runs) / 1024,
        "reward_first": curve[0],
        "reward_final": statistics.mean(curve[-w:]),
        "reward_final_per_round": [statistics.mean(s["reward"] for s in r["steps"][steps - w : steps]) for r in runs],
        "reward_curve": curve,
        "completion_length_mean": statistics.mean(s["length_mean"] for r in runs for s in r["steps"]),
        "completion_length_max": max((s["length_max"] for r in runs for s in r["steps"]
                                      if s.get("length_max") is not None), default=None),
        "optimizer": runs[0].get("optimizer"),
    }
    padding = [s["padding_fraction"] for r in runs for s in r["steps"] if s.get("padding_fraction") is not None]
    if padding:
        out["update_padding_fraction"] = statistics.mean(padding)
    phases = sorted({k for r in runs for s in r["steps"] for k in s
                     if k.startswith(("time/", "trl/")) and s[k] is not None})
    if phases:
        every = [s for r in runs for s in r["steps"]]
        out["median_phase_s"] = {k.split("/", 1)[1]: statistics.median(s[k] for s in every if s.get(k) is not None)
                                 for k in phases}
    return out


def plot(cells: list[dict], path: Path) -> None:
    """Reward per step, one panel per cell: each run thin, the mean over rounds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False)
    colors = {"trl": "tab:orange", "trl_compiled": "tab:brown", "grpo": "tab:blue", "reinforce_pp": "tab:green",
              "grpo_compiled": "tab:purple", "grpo_noshare": "tab:gray", "grpo_async": "tab:red",
              "grpo_packed": "tab:cyan"}
    for ax, c in zip(axes[0], cells):
        for side, rs in c["runs"].items():
            for r in rs:
                rewards = [s["reward"] for s in r["steps"]]
                ax.plot(range(1, len(rewards) + 1), rewards, color=colors[side], alpha=0.25, lw=0.8)
            curve = c["summary"][side]["reward_curve"]
            ax.plot(range(1, len(curve) + 1), curve, color=colors[side], lw=2, label=f"{LABELS[side]} ({len(rs)} runs)")
        ax.set_xlabel("step")
        ax.set_title(c["name"], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean char_match reward of the rollout")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The default grid: cells that differ in model size, answer length, batch and prompt length. Every
# cell runs the same alternating rounds of all sides; the summary quotes the median and range of
# the per-cell ratios. Sized to finish on a small shared CPU; pass --cell to run others.
# Cell keys besides the model and batch: ``warm=0`` starts from the random init (no SFT: the
# rewards then mean nothing); ``eos=0`` gives the saved tokenizer an EOS id the model cannot
# produce (every response runs to ``tokens``: full-length cells); ``steps=N`` overrides --steps.
# The long-tail cell: the random init (vocabulary of 48, logits near uniform) emits EOS at about
# a constant rate per token, so its answer lengths are roughly geometric (measured: mean ~70, the
# longest of 64 near 400) up to the cap of 512; both sides sample from the same saved weights with
# their ordinary settings, so the lengths follow the same law on both (each run's measured mean
# and maximum are reported).
CELL_DEFAULTS = dict(prompt_extra=0, warm=1, eos=1, steps=0)
GRID = [{**CELL_DEFAULTS, **c} for c in (
    dict(hidden=128, layers=2, heads=4, prompts=16, samples=8, tokens=8),  # 0.33M, the old headline cell
    dict(hidden=256, layers=4, heads=4, prompts=16, samples=4, tokens=32),  # 2.6M, longer answers
    dict(hidden=256, layers=4, heads=4, prompts=16, samples=8, tokens=16, prompt_extra=64),  # 2.6M, long shared prompts
    dict(hidden=512, layers=4, heads=8, prompts=16, samples=4, tokens=16),  # 10.5M
    dict(hidden=256, layers=4, heads=4, prompts=64, samples=8, tokens=32),  # 2.6M, a 64x8 batch
    dict(hidden=256, layers=4, heads=4, prompts=16, samples=4, tokens=128, warm=0, eos=0, steps=4),  # full length 128
    dict(hidden=256, layers=4, heads=4, prompts=16, samples=4, tokens=256, warm=0, eos=0, steps=4),  # full length 256
    dict(hidden=256, layers=4, heads=4, prompts=16, samples=4, tokens=512, warm=0, steps=4),         # long tail to 512
)]
CELL_KEYS = ("hidden", "layers", "heads", "prompts", "samples", "tokens", "prompt_extra", "warm", "eos", "steps")


def parse_cell(text: str) -> dict:
    """``"hidden=256 layers=4 heads=4 prompts=16 samples=4 tokens=32 prompt_extra=0"`` -> dict."""
    cell = dict(GRID[0])  # unset keys: the first cell's
    for item in text.replace(",", " ").split():
        key, value = item.split("=", 1)
        if key not in CELL_KEYS:
            raise SystemExit(f"--cell: unknown key {key!r}; valid: {', '.join(CELL_KEYS)}")
        cell[key] = int(value)
    return cell


def cell_name(cell: dict) -> str:
    kind = "" if cell.get("eos", 1) else " full length"
    if not cell.get("warm", 1):
        kind += (" long tail" if cell.get("eos", 1) else "") + ", random init"
    return (f"h{cell['hidden']}xL{cell['layers']} {cell['prompts']}x{cell['samples']} t{cell['tokens']}"
            + (f" +{cell['prompt_extra']}ch prompt" if cell["prompt_extra"] else "") + kind)


def side_threads(args) -> dict[str, int]:
    """``--side-threads trl=2 grpo=2`` -> ``{"trl": 2, "grpo": 2}``."""
    out = {}
    for item in args.side_threads:
        side, _, n = item.partition("=")
        if side not in SIDES or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--side-threads {item!r}: expected SIDE=N with SIDE one of {', '.join(SIDES)}, N >= 1")
        out[side] = int(n)
    return out


def run_cell(args, cell: dict, tmp: Path) -> dict:
    """Prepare one starting model, then ``args.rounds`` alternating rounds of every side."""
    spec = dict(model_dir=str(tmp / "model"), threads=args.threads, seed=args.seed, prompts=cell["prompts"],
                samples=cell["samples"], max_new_tokens=cell["tokens"], lr=args.lr,
                steps=cell.get("steps") or args.steps,
                rpp_kl_coef=args.rpp_kl_coef, sft_steps=args.sft_steps if cell.get("warm", 1) else 0,
                hidden_size=cell["hidden"], num_layers=cell["layers"], num_heads=cell["heads"],
                prompt_extra=cell["prompt_extra"], gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16,
                train_size=5000, no_eos=args.no_eos or not cell.get("eos", 1), adamw=args.adamw,
                packed_tokens=args.packed_tokens)
    prep = launch("prepare", {**spec, "data_seed": args.seed}, tmp, "prepare")
    spec["longest_prompt_tokens"] = prep["longest_prompt_tokens"]
    print(f"[{cell_name(cell)}] warm start: {spec['sft_steps']} SFT steps in {prep['sft_seconds']:.1f}s, "
          f"loss {prep['sft_loss_first']} -> {prep['sft_loss_last']}; {prep['parameters']} parameters; "
          f"torch {prep['torch']}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in args.sides}
    for rnd in range(args.rounds):
        order = args.sides[rnd % len(args.sides):] + args.sides[: rnd % len(args.sides)]
        for side in order:
            # Same sampling seed for every side within a round; a new one each round.
            run_spec = {**spec, "seed": args.seed + rnd, "data_seed": args.seed, "run_dir": str(tmp / f"{side}-{rnd}"),
                        "threads": side_threads(args).get(side, args.threads)}
            r = launch(side, run_spec, tmp, f"{side}-{rnd}")
            runs[side].append(r)
            med = statistics.median(s["time"] for s in r["steps"])
            cpu = statistics.median(s["cpu"] for s in r["steps"])
            answers = statistics.mean(s["length_mean"] for s in r["steps"])
            print(f"[{cell_name(cell)}] round {rnd + 1}/{args.rounds} {LABELS[side]:>18}: median step {med:.3f}s "
                  f"(CPU {cpu:.3f}s), first step {r['steps'][0]['time']:.2f}s, "
                  f"reward {r['steps'][0]['reward']:.3f} -> {r['steps'][-1]['reward']:.3f}, "
                  f"answers mean {answers:.1f} tokens, "
                  f"peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB, load {r['load_at_start'][0]:.2f}", flush=True)
    summary = {s: summarise(rs, args.final_window) for s, rs in runs.items()}
    # paired within a round (same machine load window): the fairer ratio under a drifting load
    for side in args.sides:
        for key in ("median_step_s", "median_step_cpu_s"):
            ours, trl = summary[side][key + "_per_round"], summary["trl"][key + "_per_round"]
            summary[side][key.replace("median_", "ratio_") + "_per_round"] = [a / b for a, b in zip(ours, trl)]
    spec_public = {k: v for k, v in spec.items() if k != "model_dir"}
    return {"cell": cell, "name": cell_name(cell), "parameters": prep["parameters"], "spec": spec_public,
            "warm_start": prep, "summary": summary, "runs": runs,
            "settings": {s: trl_settings({**spec, "seed": args.seed}, s) if s.startswith("trl")
                         else ours_settings(spec, s) for s in args.sides}}


def answer_label(c: dict) -> str:
    """The cell's measured answer lengths: TRL's mean, the range of our sides' means, the longest."""
    sm = c["summary"]
    ours = [v["completion_length_mean"] for k, v in sm.items() if not k.startswith("trl")]
    longest = max((v["completion_length_max"] or 0) for v in sm.values())
    trl = f"{sm['trl']['completion_length_mean']:.1f} TRL" if "trl" in sm else ""
    mine = f"{min(ours):.1f}-{max(ours):.1f} ours" if ours else ""
    return f"answers: mean {', '.join(x for x in (trl, mine) if x)}; longest {longest:.0f}"


def paired(c: dict, side: str, base: str, clock: str) -> list[float]:
    """``side`` / ``base`` median step time, paired within each round."""
    key = "median_step_s_per_round" if clock == "wall" else "median_step_cpu_s_per_round"
    return [a / b for a, b in zip(c["summary"][side][key], c["summary"][base][key])]


def grid_table(cells: list[dict], sides: list[str]) -> list[str]:
    """Per cell (labelled by its measured answer lengths): paired (same round) step-time ratios
    against TRL by CPU and by wall clock, median over rounds with the range; peak memory ratios and
    final rewards; then each side's median and range over the grid."""
    ours = [s for s in sides if s != "trl"]
    pairs = [(s, "trl") for s in ours]
    if "grpo" in sides and "reinforce_pp" in sides:
        pairs.append(("reinforce_pp", "grpo"))
    if "grpo_compiled" in sides and "trl_compiled" in sides:
        pairs.append(("grpo_compiled", "trl_compiled"))
    lines: list[str] = []
    per_pair: dict[tuple[str, str], dict[str, list[float]]] = {pr: {"cpu": [], "wall": []} for pr in pairs}
    for clock in ("cpu", "wall"):
        head = f"| cell ({clock} clock) | params | TRL step (s) | " + " | ".join(f"{LABELS[a]} / {LABELS[b]} [range]"
                                                                                 for a, b in pairs)
        lines += [head + " |", "|" + "---|" * (3 + len(pairs))]
        for c in cells:
            step = c["summary"]["trl"]["median_step_cpu_s" if clock == "cpu" else "median_step_s"]
            row = f"| {c['name']} ({answer_label(c)}) | {c['parameters'] / 1e6:.2f}M | {step:.3f} |"
            for pr in pairs:
                r = paired(c, *pr, clock)
                per_pair[pr][clock].append(statistics.median(r))
                row += f" {statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}] |"
            lines.append(row)
        lines.append("")
    head = "| cell | " + " | ".join(f"{LABELS[s]}: peak RSS / TRL, final reward" for s in ours)
    head += " | TRL final reward |"
    lines += [head, "|" + "---|" * (2 + len(ours))]
    for c in cells:
        sm = c["summary"]
        cols = [f"{sm[s]['peak_rss_mib'] / sm['trl']['peak_rss_mib']:.2f}x, {sm[s]['reward_final']:.3f}" for s in ours]
        lines.append(f"| {c['name']} | " + " | ".join(cols) + f" | {sm['trl']['reward_final']:.3f} |")
    lines.append("")
    for (a, b), clocks in per_pair.items():
        for clock, v in clocks.items():
            lines.append(f"{LABELS[a]} / {LABELS[b]}, {clock} clock, over {len(v)} cells: "
                         f"median {statistics.median(v):.2f}x, range {min(v):.2f}x-{max(v):.2f}x")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="RL steps per run")
    p.add_argument("--rounds", type=int, default=2, help="each trainer runs this many times per cell, alternating")
    p.add_argument("--cell", action="append", default=None,
                   help="run this cell instead of the default grid (repeatable): "
                        + " ".join(f"{k}=N" for k in CELL_KEYS))
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rpp-kl-coef", type=float, default=0.01,
                   help="reinforce_pp: k1 KL in the reward with this beta (0 = no KL, no reference model)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="on on both sides (default: off on both; ours then runs without share_prompt)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast on both sides (TRL bf16=True, ours autocast=bfloat16); "
                        "default float32 on both")
    p.add_argument("--no-eos", action="store_true",
                   help="give the saved tokenizer an EOS id the model cannot produce: every response runs to "
                        "the cell's tokens on both sides (for long-generation cells; rewards then mean nothing)")
    p.add_argument("--sft-steps", type=int, default=100, help="warm start before RL (shared by all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every worker")
    p.add_argument("--side-threads", action="append", default=[], metavar="SIDE=N",
                   help="torch threads for one side instead of --threads (repeatable), e.g. trl=2: TRL at its best "
                   "thread count against grpo_async, whose producer and trainer take a core each at --threads 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-window", type=int, default=3, help="final reward = mean over this many last steps")
    p.add_argument("--sides", nargs="+", default=None, choices=SIDES,
                   help=f"default {' '.join(DEFAULT_SIDES)}; the compiled sides with --compiled")
    p.add_argument("--compiled", action="store_true",
                   help=f"the compiled comparison: --sides {' '.join(COMPILED_SIDES)}")
    p.add_argument("--adamw", choices=ADAMW, default="fused",
                   help="the AdamW implementation on every side (TRL's default optim adamw_torch_fused is fused; "
                   "torch.optim.AdamW() on a CPU, ours, is the for-loop)")
    p.add_argument("--packed-tokens", type=int, default=2048,
                   help="grpo_packed: micro_batch_tokens (raised to the cell's longest sequence)")
    p.add_argument("--out", default=None,
                   help="JSON (default benchmarks/results/lm_vs_trl.json; --quick: /tmp/lm_vs_trl_quick.json), "
                   "a PNG beside it")
    p.add_argument("--log", default=None, help="a copy of this script's output (default: --out with .log)")
    p.add_argument("--quick", action="store_true", help="smoke run: first grid cell, 2 steps, 1 round, 10 SFT steps")
    p.add_argument("--worker", nargs=3, metavar=("ROLE", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    cells = [parse_cell(c) for c in args.cell] if args.cell else list(GRID)
    if args.sides and args.compiled:
        p.error("--compiled sets the sides; give --sides or --compiled")
    args.sides = args.sides or (COMPILED_SIDES if args.compiled else DEFAULT_SIDES)
    if args.quick:
        args.steps, args.rounds, args.sft_steps, cells = 2, 1, 10, [{**c, "steps": 0} for c in cells[:1]]
    if "trl" not in args.sides:
        p.error("--sides must include trl (ratios are against it)")

    out_path = Path(args.out or ("/tmp/lm_vs_trl_quick.json" if args.quick else "benchmarks/results/lm_vs_trl.json"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else out_path.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout = Tee(sys.stdout, open(log_path, "w"))
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    load_start = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average at start (1/5/15 min): "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"{len(cells)} cells x {args.rounds} rounds x {len(args.sides)} sides x {args.steps} steps; "
          "gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'} on both sides; "
          f"{'bfloat16 autocast' if args.bf16 else 'float32'} on both sides; AdamW {args.adamw} on every side; "
          f"sides {' '.join(args.sides)}", flush=True)
    side_threads(args)  # a bad --side-threads stops here, before any cell
    t_all = time.perf_counter()
    results = []
    for i, cell in enumerate(cells):
        with tempfile.TemporaryDirectory(prefix="lm_vs_trl_") as tmp:
            results.append(run_cell(args, cell, Path(tmp)))
        print(f"[{cell_name(cell)}] done, cell {i + 1}/{len(cells)}, load {os.getloadavg()[0]:.2f}, "
              f"{time.perf_counter() - t_all:.0f}s so far", flush=True)
    load_end = os.getloadavg()
    lines = grid_table(results, args.sides)
    print()
    print(f"{args.steps} steps x {args.rounds} rounds per cell, lr {args.lr}, reinforce_pp KL coef {args.rpp_kl_coef}, "
          f"{args.threads} torch thread(s)"
          + "".join(f", {side} {n}" for side, n in side_threads(args).items()) + "; "
          "ratios = ours / TRL's median step time, paired within each round (median over rounds [range])")
    print("\n".join(lines))
    print(f"\nload average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
          f"at end (1/5/15 min): {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"total {time.perf_counter() - t_all:.0f}s")

    import importlib.metadata as md

    packages = ("torch", "transformers", "trl", "accelerate", "datasets", "reinforcepp")
    versions = {pkg: md.version(pkg) for pkg in packages}
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "load_start": load_start, "load_end": load_end},
        "versions": versions,
        "threads": {"default": args.threads, **side_threads(args)},
        "cells": results,
        "table": lines,
    }
    for c in results:
        for side, settings in c["settings"].items():
            if not side.startswith("trl"):
                settings.pop("model", None)
    out_path.write_text(json.dumps(result, indent=1))
    png = out_path.with_suffix(".png")
    plot(results, png)
    print(f"wrote {out_path}, {png} and {log_path}")


if __name__ == "__main__":
    main()
