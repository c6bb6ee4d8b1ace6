"""The part of the vLLM engine that runs inside vLLM's worker process.

vLLM imports this module in its worker (``worker_extension_cls``) and mixes :class:`WeightSync`
into the worker, so the trainer can call ``llm.collective_rpc("reinforcepp_load_weights", ...)``.
Nothing here is imported by the trainer itself.

On CPUs vLLM repacks each linear layer's weight into a oneDNN handle after loading and drops the
tensor, which a later ``load_weights`` cannot refill. Importing this module (before the model is
built) keeps CPU weights as ordinary tensors read by ``torch.nn.functional.linear``: weight
updates then land where the forward pass reads them, and the numbers are torch's, as in the
trainer. GPUs are left untouched.
"""

from __future__ import annotations

from typing import Any

import torch


def _keep_plain_cpu_weights() -> None:
    from vllm.model_executor.layers import utils
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return

    def plain_linear(layer: Any, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = plain_linear


_keep_plain_cpu_weights()


class WeightSync:
    """Mixed into vLLM's worker: ``self`` is the worker.

    Under ``vllm serve`` (``--worker-extension-cls reinforcepp.engines.vllm_worker.WeightSync``
    with ``VLLM_SERVER_DEV_MODE=1``) the methods are reached through ``POST /collective_rpc``,
    whose arguments are strings: a rollout pool (``rollout_urls=vllm+http://...``) pushes each
    weight piece as base64 (:meth:`reinforcepp_load_weights_b64`) and checks the model with
    :meth:`reinforcepp_describe`.
    """

    model_runner: Any

    def reinforcepp_load_weights(self, weights: Any) -> int:
        """Load named tensors into the model with the model's own ``load_weights`` (which maps
        Hugging Face names to vLLM's fused layers). ``weights`` is a list of ``(name, tensor)``
        when the worker runs in the trainer's process, or a safetensors blob (bytes) when it runs
        in a process of its own. Returns the number of tensors received."""
        if isinstance(weights, (bytes, bytearray, memoryview)):
            from safetensors.torch import load

            weights = list(load(bytes(weights)).items())
        self.model_runner.model.load_weights(iter(weights))
        return len(weights)

    def reinforcepp_load_weights_b64(self, piece: str) -> int:
        """Load one weight piece: a safetensors file of whole tensors (Hugging Face names),
        base64-encoded (``/collective_rpc`` passes strings only). Returns the number of tensors."""
        import base64

        return self.reinforcepp_load_weights(base64.b64decode(piece, validate=True))

    def reinforcepp_describe(self) -> dict:
        """What a client checks before pushing weights: the vocabulary size and the dtype."""
        config = self.model_runner.model_config
        return {"vocab_size": int(config.get_vocab_size()), "dtype": str(config.dtype).removeprefix("torch."),
                "model": str(config.model)}
