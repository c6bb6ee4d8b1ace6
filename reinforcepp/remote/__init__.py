"""Reference, reward and rollout models as remote services.

Only the actor is trained; the reference and the reward models only run inference, and
generation can run on machines of its own, so they can live on another machine behind a URL:

- :mod:`.client`: the one HTTP client (deadline, retries, no redirects, token, size limit,
  concurrency) behind every remote call;
- :mod:`.reference`: :class:`RemoteReference`, reference log-probs from a server, with the local
  reference's interface;
- :mod:`.reward`: :class:`RemoteRewardFunction`, a reward server as a reward function;
- :mod:`.rollout`: :class:`~.rollout.RolloutPool`, rollout servers (``reinforcepp serve rollout``
  or a plain ``vllm serve``) behind one interface, for ``engine=remote``
  (:mod:`reinforcepp.engines.remote`); :mod:`.rollout_server`: one rollout server, its checks and
  its requests; :mod:`.weights`: the pieces and chunks of a weight push.

This room is the client side only; the servers (``reinforcepp serve``) are in
:mod:`reinforcepp.serve`. The protocol is in :mod:`.protocol` and docs/remote.md.
"""

from typing import Any, TypeGuard

from .client import RemoteClient, RemoteError, RemoteSettings, read_token
from .reference import RemoteReference
from .reward import RemoteRewardFunction


def is_url(name: object) -> TypeGuard[str]:
    """``http://...`` or ``https://...``."""
    return isinstance(name, str) and name.startswith(("http://", "https://"))


__all__ = [
    "RemoteClient", "RemoteError", "RemoteReference", "RemoteRewardFunction", "RemoteSettings", "is_url", "read_token"
]


def settings_from(config: Any) -> RemoteSettings:
    """:class:`RemoteSettings` from a config with the ``remote_*`` keys (``LMConfig``)."""
    return RemoteSettings(
        timeout=float(config.remote_timeout),
        retries=int(config.remote_retries),
        token=read_token(config.remote_token_file),
        concurrency=int(config.remote_concurrency),
    )


__all__ += ["settings_from"]
