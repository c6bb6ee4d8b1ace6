"""``reinforcepp serve reference | reward | rollout``: models that only run inference, behind a URL.

    reinforcepp serve reference --model RUN/reference --port 8000
    reinforcepp serve reward --reward rewards.py:accuracy --port 8001
    reinforcepp serve rollout --model MODEL --engine vllm --port 8002
    reinforcepp train ref_model=http://127.0.0.1:8000 reward_funcs=http://127.0.0.1:8001/rewards \
        rollout_urls=http://127.0.0.1:8002

The server binds 127.0.0.1 unless told otherwise; any other host needs a token
(``--token-file``, or the ``REINFORCEPP_REMOTE_TOKEN`` environment variable), which clients send
as ``Authorization: Bearer <token>``. Protocol: docs/remote.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..remote.client import RemoteError, is_loopback, read_token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reinforcepp serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{reference,reward,rollout}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; any other needs a token)")
        p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
        p.add_argument("--token-file", default=None,
                       help="file whose first line is the bearer token (default: $REINFORCEPP_REMOTE_TOKEN)")
        p.add_argument("--max-request-mb", type=float, default=32.0,
                       help="larger request bodies are refused (HTTP 413)")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    ref = sub.add_parser("reference", help="per-token log-probs of a causal LM for given prompt and response ids")
    ref.add_argument("--model", required=True, help="Hugging Face model directory or hub name (e.g. RUN/reference)")
    ref.add_argument("--tokenizer", default=None,
                     help="tokenizer (default: the model's; its hash lets clients check they match)")
    ref.add_argument("--max-batch-tokens", type=int, default=16384,
                     help="padded tokens per forward pass; concurrent requests are batched up to it")
    ref.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="float32")
    ref.add_argument("--device", default="auto")
    ref.add_argument("--trust-remote-code", action="store_true")
    common(ref)

    rew = sub.add_parser("reward", help="a reward source (file.py:function, module:function, verl:..., "
                                        "openrlhf:..., rm:MODEL) over HTTP")
    rew.add_argument("--reward", required=True, help="reward spec, as in reward_funcs")
    rew.add_argument("--workers", type=int, default=1,
                     help="requests scored at once (threads); raise it only for thread-safe reward functions")
    common(rew)

    out = sub.add_parser("rollout", help="generation (token ids in; tokens, log-probs, weight version out) with "
                         "weights the trainer pushes")
    out.add_argument("--model", required=True, help="Hugging Face model directory or hub name: the architecture, and "
                     "the weights until the first push")
    out.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="hf: this package's sampling loop; vllm: "
                     "vLLM's offline engine (bash install.sh vllm)")
    out.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's; its hash and EOS ids let "
                     "clients check they match)")
    out.add_argument("--keep-versions", type=int, default=3, help="weight versions held beside the active one's "
                     "(async_rollouts=N needs N + 1)")
    out.add_argument("--max-batch-prompts", type=int, default=256, help="concurrent requests are generated together "
                     "up to this many prompts")
    out.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="float32")
    out.add_argument("--device", default="auto")
    out.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="--engine vllm on a GPU: the "
                     "fraction of its memory vLLM takes")
    out.add_argument("--seed", type=int, default=0, help="seed of unseeded requests' draws")
    out.add_argument("--trust-remote-code", action="store_true")
    common(out)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input (a missing file, a public host without a token) is an
    :class:`~reinforcepp.errors.InputError`: ``reinforcepp`` prints its one line and exits with 2
    (the traceback with ``--debug``)."""
    from ..errors import InputError, one_line

    args = _parser().parse_args(argv)
    try:
        return _serve(args)
    except (RemoteError, ValueError, OSError) as exc:
        raise InputError(f"{args.kind}: {one_line(exc)}") from exc


def _serve(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from .app import MISSING_EXTRA, bind, run

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError(MISSING_EXTRA) from None
    token = read_token(args.token_file)
    if not is_loopback(args.host) and not token:
        raise ValueError(f"--host {args.host} is reachable from other machines: give a token with --token-file "
                         "or REINFORCEPP_REMOTE_TOKEN")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = int(args.max_request_mb * (1 << 20))
    if args.kind == "reference":
        app, what = _reference(args, token, limit), f"reference model {args.model}"
    elif args.kind == "rollout":
        app, what = _rollout(args, token, limit), f"rollout engine {args.engine} for {args.model}"
    else:
        app, what = _reward(args, token, limit), f"reward {args.reward}"
    sock = bind(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    path = "/rewards" if args.kind == "reward" else ""
    run(app, sock, f"reinforcepp serve: {what} on http://{host}:{sock.getsockname()[1]}{path}")
    return 0


def _check_model_path(model: str) -> None:
    """A local path given as ``--model`` must be a directory (a hub name is left to the loader)."""
    from pathlib import Path

    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise ValueError(f"--model {model}: no such model directory")


def _load_served(args: argparse.Namespace, device: Any, dtype: Any, command: str, without_tokenizer: str):
    """The frozen model of ``serve reference|rollout`` on ``device`` and its tokenizer, or None when
    ``--model`` holds no tokenizer and ``--tokenizer`` is not given (``without_tokenizer`` tells
    what clients then check)."""
    from ..lm.models import frozen, load_causal_lm, load_tokenizer

    trust = args.trust_remote_code
    model = frozen(load_causal_lm(args.model, dtype=dtype, device=device, trust_remote_code=trust))
    try:
        return model, load_tokenizer(args.tokenizer or args.model, trust)
    except (OSError, ValueError, TypeError):
        if args.tokenizer:
            raise
        print(f"reinforcepp serve {command}: no tokenizer in {args.model}; {without_tokenizer}", file=sys.stderr)
        return model, None


def _reference(args: argparse.Namespace, token: str | None, limit: int):
    from ..lm.models import resolve_device, resolve_dtype
    from .reference import reference_app

    if args.max_batch_tokens < 1:
        raise ValueError(f"--max-batch-tokens must be >= 1, got {args.max_batch_tokens}")
    _check_model_path(args.model)
    device = resolve_device(args.device)
    model, tokenizer = _load_served(args, device, resolve_dtype(args.dtype, device), "reference",
                                    "clients check only the vocabulary size (give --tokenizer to check it too)")
    pad = tokenizer.pad_token_id if tokenizer is not None else getattr(model.config, "pad_token_id", None)
    return reference_app(model, tokenizer, model_name=args.model, token=token, max_batch_tokens=args.max_batch_tokens,
                         max_request_bytes=limit, pad_token_id=pad)


def _reward(args: argparse.Namespace, token: str | None, limit: int):
    from ..rewards import load_reward_source
    from .reward import reward_app

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    source = load_reward_source(args.reward)
    return reward_app(source.fn, spec=args.reward, token=token, max_request_bytes=limit, threads=args.workers)


def _rollout(args: argparse.Namespace, token: str | None, limit: int):
    from types import SimpleNamespace

    import torch

    from ..lm.models import resolve_device, resolve_dtype
    from .backends import hf_backend, vllm_backend
    from .rollout import rollout_app

    if args.keep_versions < 1 or args.max_batch_prompts < 1:
        raise ValueError(f"--keep-versions and --max-batch-prompts must be >= 1, got {args.keep_versions}, "
                         f"{args.max_batch_prompts}")
    _check_model_path(args.model)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    load_device = torch.device("cpu") if args.engine == "vllm" else device  # vLLM takes the weights from a CPU copy
    model, tokenizer = _load_served(args, load_device, resolve_dtype(args.dtype, device), "rollout",
                                    "clients check only the vocabulary size and EOS ids")
    eos = tokenizer.eos_token_id if tokenizer is not None else getattr(model.config, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids:
        raise ValueError(f"--model {args.model}: neither its tokenizer nor its config names an EOS token")
    pad = tokenizer.pad_token_id if tokenizer is not None else getattr(model.config, "pad_token_id", None)
    pad = eos_ids[0] if pad is None else pad
    ids = tokenizer if tokenizer is not None else SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
    if args.engine == "vllm":
        from ..engines.vllm import vllm_available

        if not vllm_available():
            raise ValueError("--engine vllm: vLLM is not installed (bash install.sh vllm)")
        backend = vllm_backend(model, ids, device, args.gpu_memory_utilization, args.seed)
    else:
        backend = hf_backend(model, ids, device)
    return rollout_app(backend, tokenizer, model_name=args.model, eos_token_ids=eos_ids, token=token,
                       keep_versions=args.keep_versions, max_batch_prompts=args.max_batch_prompts,
                       max_request_bytes=limit)
