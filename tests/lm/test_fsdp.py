"""FSDP2 on two gloo ranks (real ``torch.distributed``, spawned processes):

* 1 rank = 2 FSDP ranks: the same rollout trained on one process, or split over two ranks that
  shard the policy, gives the same loss and the same updated float32 weights;
* the reference offloaded to the CPU (`ref_offload`) gives the same step;
* a sharded checkpoint resumed on two ranks ends where the uninterrupted run ends;
* the same checkpoint resumed on ONE process restores the optimizer state exactly (the DCP
  shards are resharded) and trains on;
* the checkpoint's model loads with ``from_pretrained``;
* the DCP metadata reader refuses a planted pickle payload without running it.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from reinforcepp.config import ConfigError
from reinforcepp.lm.trainer import Trainer
from tests.lm.helpers import fraction_of_a, reverse_dataset, small_config, tiny_policy
from tests.lm.test_lm_distributed import PROMPTS, _settings, _train_once
from tests.ranks import run_trainer_ranks


def _trainer(tmp: Path, **overrides) -> Trainer:
    tok, model = tiny_policy()
    return Trainer(small_config(tmp, **overrides), model=model, tokenizer=tok, reward_funcs=[fraction_of_a],
                   train_dataset=reverse_dataset(16))


def _run_settings(tmp: Path, **overrides):
    base = dict(prompts_per_step=PROMPTS, samples_per_prompt=4, micro_batch_size=4, total_steps=2, save_every=1,
                keep_last=3, deterministic=True, output_dir=str(tmp))
    return {**base, **overrides}


def _full_optimizer_state(trainer: Trainer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(trainer.policy, trainer.optimizer, options=options)
    return {name: {k: v.clone() for k, v in s.items()} for name, s in state.get("state", {}).items()}  # rank 0 only


def _rank_results(rank: int, world: int, tmp: str) -> None:
    root = Path(tmp)
    # 1 rank = 2 ranks on a fixed rollout
    trainer = _trainer(root / "fixed", fsdp=True, **_settings(root / "fixed"))
    assert trainer.parallel.kind == "fsdp"
    _, metrics, _ = _train_once(trainer, rank, world)
    state = trainer.parallel.gather_state(trainer.policy)
    # the same with the reference's shards held on the CPU (FSDP2 CPUOffloadPolicy)
    offload = _trainer(root / "offload", fsdp=True, ref_offload=True, **_settings(root / "offload"))
    _, offload_metrics, _ = _train_once(offload, rank, world)
    offload_state = offload.parallel.gather_state(offload.policy)
    # an uninterrupted 2-step run with a checkpoint after each step
    run = _trainer(root / "run", fsdp=True, **_run_settings(root / "run"))
    run.train()
    final = run.parallel.gather_state(run.policy)
    # resume from its step-1 checkpoint (copied, as a killed run would have left it)
    if rank == 0:
        step1 = Path("checkpoints") / "step_00000001"
        shutil.copytree(root / "run" / step1, root / "resumed" / step1)
        shutil.copytree(root / "run" / "reference", root / "resumed" / "reference")
        shutil.copy(root / "run" / "reference.json", root / "resumed" / "reference.json")
        shutil.copy(root / "run" / "metrics.jsonl", root / "resumed" / "metrics.jsonl")
    run.dist.barrier()
    resumed = _trainer(root / "resumed", fsdp=True, resume=True, **_run_settings(root / "resumed"))
    assert resumed.step == 1
    step1_optimizer = _full_optimizer_state(resumed)
    resumed.train()
    resumed_final = resumed.parallel.gather_state(resumed.policy)
    if rank == 0:
        result = {
            "loss": metrics["loss/policy"], "params": state,
            "offload_loss": offload_metrics["loss/policy"], "offload_params": offload_state,
            "final": final, "resumed_final": resumed_final, "step1_optimizer": step1_optimizer,
        }
        torch.save(result, root / "result.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    run_trainer_ranks(_rank_results, (str(tmp),))
    return tmp, torch.load(tmp / "result.pt")


def test_one_rank_equals_two_fsdp_ranks(tmp_path, two_ranks):
    _, result = two_ranks
    single = _trainer(tmp_path, **_settings(tmp_path))
    _, metrics, _ = _train_once(single, 0, 1)
    assert result["loss"] == pytest.approx(metrics["loss/policy"], abs=1e-6)
    expected = single.policy.state_dict()
    assert result["params"].keys() == expected.keys()
    for name, value in result["params"].items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_reference_offload_changes_nothing(two_ranks):
    _, result = two_ranks
    assert result["offload_loss"] == result["loss"]
    for name, value in result["params"].items():
        torch.testing.assert_close(result["offload_params"][name], value, atol=0, rtol=0, msg=name)


def test_fsdp_resume_equals_uninterrupted(two_ranks):
    _, result = two_ranks
    for name, value in result["final"].items():
        torch.testing.assert_close(result["resumed_final"][name], value, atol=0, rtol=0, msg=name)  # bit-exact


def test_fsdp_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    """2 ranks -> 1 rank: the sharded optimizer state is gathered back whole, the weights come
    from the safetensors model, and training goes on."""
    from transformers import AutoModelForCausalLM

    root, result = two_ranks
    ckpt = root / "run" / "checkpoints" / "step_00000001"
    assert sorted(p.name for p in (ckpt / "optimizer").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    AutoModelForCausalLM.from_pretrained(ckpt / "model")  # loads as a plain HF model
    shutil.copytree(ckpt, tmp_path / "checkpoints" / ckpt.name)
    shutil.copytree(root / "run" / "reference", tmp_path / "reference")
    for name in ("reference.json", "metrics.jsonl"):  # a run folder holds its reference record and its log
        shutil.copy(root / "run" / name, tmp_path / name)
    one = _trainer(tmp_path, resume=True, **_run_settings(tmp_path, total_steps=2))
    assert one.parallel.kind == "single" and one.step == 1
    names = {id(p): n for n, p in one.policy.named_parameters()}
    loaded = {names[id(p)]: s for p, s in one.optimizer.state.items()}
    assert loaded.keys() == result["step1_optimizer"].keys()
    for name, state in result["step1_optimizer"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded[name][key], value, atol=0, rtol=0, msg=f"{name}.{key}")
    one.train()
    assert one.step == 2


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_metadata_with_a_payload_is_refused(tmp_path):
    from reinforcepp.lm.sharded_checkpoint import UnsafeCheckpointError, load_metadata, load_optimizer, save_optimizer

    _, model = tiny_policy()
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = tmp_path / "optimizer"
    save_optimizer(model, optimizer, ckpt)
    load_optimizer(model, optimizer, ckpt)  # the genuine metadata passes the allow-list
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="system, which is not checkpoint data"):
        load_metadata((ckpt / ".metadata").read_bytes())
    with pytest.raises(UnsafeCheckpointError, match="system, which is not checkpoint data"):
        load_optimizer(model, optimizer, ckpt)
    assert not marker.exists()


def test_fsdp_without_torchrun_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        _trainer(tmp_path, fsdp=True)
    with pytest.raises(ConfigError, match="ref_offload=true .* needs fsdp=true"):
        _trainer(tmp_path, ref_offload=True)


def test_cli_fsdp_without_torchrun_says_how_to_launch(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-m", "reinforcepp.cli", "train", "fsdp=true", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("reinforcepp train: fsdp=true shards the models over torchrun's ranks")
    assert "torchrun --nproc_per_node N -m reinforcepp.cli train fsdp=true" in proc.stderr
