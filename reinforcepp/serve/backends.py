"""The engines a rollout server samples with (``reinforcepp serve rollout --engine hf|vllm``):
each is a :class:`Backend`, sampling plus loading a whole set of weights.
"""

from typing import Any, Callable, Optional

import torch

from ..engines import Generation

Weights = dict[str, torch.Tensor]


class Backend:
    """What the server needs of an engine: sampling, and loading a version's weights.

    Args:
        model: the Hugging Face model the server was started with (its names, shapes and
            dtype are what a push must match).
        sample: ``(prompt_ids, k, params) -> Generation``.
        load: makes ``{name: tensor}`` (a whole set of weights) the ones sampled with.
    """

    def __init__(
        self, name: str, model: torch.nn.Module, sample: Callable[..., Generation], load: Callable[[Weights], None]
    ) -> None:
        self.name, self.model, self.sample, self.load = name, model, sample, load
        state = model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtype = next(model.parameters()).dtype
        groups: dict[int, list[str]] = {}
        for k, v in state.items():  # tied weights share storage: either name covers both
            groups.setdefault(v.data_ptr(), []).append(k)
        self.groups = list(groups.values())

    def missing(self, tensors: Weights) -> Optional[str]:
        """The first weight a push left out (None when every one is there)."""
        for names in self.groups:
            if not any(n in tensors for n in names):
                return names[0]
        return None


def hf_backend(model: torch.nn.Module, tokenizer: Any, device: torch.device) -> Backend:
    """The ``hf`` engine (:class:`SharedPromptSampler`) on ``model``; loads copy into it in place."""
    from ..engines import SharedPromptSampler

    engine = SharedPromptSampler(model, tokenizer, device=device)
    mine = model.state_dict(keep_vars=True)

    def load(tensors: Weights) -> None:
        with torch.no_grad():
            for name, t in tensors.items():
                mine[name].copy_(t)

    return Backend("hf", model, engine.generate, load)


def vllm_backend(
    model: torch.nn.Module, tokenizer: Any, device: torch.device, gpu_memory_utilization: float, seed: int
) -> Backend:
    """The ``vllm`` engine built from ``model`` (its config and weights); loads go through
    vLLM's ``load_weights`` (:meth:`VLLMEngine.sync_weights`)."""
    from types import SimpleNamespace

    from ..engines.vllm import VLLMEngine

    settings = SimpleNamespace(
        vllm_gpu_memory_utilization=gpu_memory_utilization, vllm_sleep=False, seed=seed, trust_remote_code=False
    )
    engine = VLLMEngine(model, tokenizer, device=device, config=settings)

    def load(tensors: Weights) -> None:
        engine.sync_weights(torch.nn.Module(), lambda: list(tensors.items()))

    return Backend("vllm", model, engine.generate, load)
