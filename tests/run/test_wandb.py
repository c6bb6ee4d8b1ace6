"""W&B in offline mode receives exactly the scalars TensorBoard receives: same tags, same steps,
same values, from a real training run (``wandb_project=``).

Needs the ``wandb`` package (the ``test`` extra installs it, so CI runs this test); where it is
not installed the test is skipped saying so, except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reinforcepp.lm.trainer import Trainer
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy

try:
    import wandb  # noqa: F401

    HAVE_WANDB = True
except ImportError:
    HAVE_WANDB = False
    if os.environ.get("CI"):
        raise RuntimeError("CI must install wandb (the test extra) so that tests/run/test_wandb.py runs") from None

pytestmark = pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (`pip install -e .[test]` installs it)")

BLOCK = 32768
"""W&B's transaction log (``run-*.wandb``) is written in LevelDB's log format: 32 KiB blocks of
records, each with a 7-byte header (CRC-32, little-endian length, type: 1 full, 2 first,
3 middle, 4 last), after a 7-byte file header (``:W&B``, a magic number, a version)."""


def wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def wandb_scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    """``{(key, step): value}`` of every history row W&B wrote offline under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict[tuple[str, int], float] = {}
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = int(items.pop("_step"))
        out.update({(k, step): float(v) for k, v in items.items() if not k.startswith("_")})
    return out


def tensorboard_scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_wandb_offline_gets_the_scalars_tensorboard_gets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    tok, model = tiny_policy()
    config = small_config(tmp_path, total_steps=3, eval_every=2, eval_max_prompts=4, eval_samples=2, tensorboard=True,
                          wandb_project="reinforcepp-test")
    Trainer(config, model=model, tokenizer=tok, reward_funcs=[fraction_of_a], train_dataset=reverse_dataset(16),
            eval_dataset=reverse_dataset(4, seed=1)).train()
    run = tmp_path / "run"
    board, logged = tensorboard_scalars(run), wandb_scalars(run)
    assert {k for k, _ in board} >= {"reward/mean", "kl/mean_token", "eval/reward_mean", "eval/accuracy"}
    assert sorted(board) == sorted(logged)
    for key, value in board.items():  # TensorBoard keeps float32
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-30), key
    assert {step for _, step in board} == {0, 1, 2, 3}  # the evaluation at step 0, then every step
