"""A reward server over HTTP (JSON) as a reward function, on the shared client of
:mod:`reinforcepp.remote` (the same one a remote reference uses)."""

from __future__ import annotations

from typing import Any

from ..remote.client import RemoteError, RemoteSettings
from ..remote.reward import RemoteRewardFunction
from .base import RewardError


class RemoteReward(RemoteRewardFunction):
    """A reward server over HTTP (JSON), as a reward function.

    Request: ``POST url`` with body ``{"prompts": [...], "completions": [...], "query":
    [prompt + completion, ...], "labels": [...], **columns}``: ``query``, ``prompts`` and
    ``labels`` are OpenRLHF's remote reward protocol, ``labels`` filled from the ``labels``,
    ``label`` or ``answer`` column. Response: ``{"rewards": [...]}`` or a plain JSON list, one
    number per completion. With ``batch_size`` the batch is sent in chunks of that many
    completions, concurrently. docs/remote.md has the protocol and the client's guarantees
    (a total deadline per request, retries on connection errors and 502/503/504, no redirects,
    no proxy for loopback, a bearer token, a response size limit).

    Args:
        url: the endpoint the requests are posted to, as given.
        timeout: seconds one request may take in total (``settings`` overrides it).
        batch_size: completions per request (``None``: the whole batch in one).
        settings: the client's :class:`~reinforcepp.remote.RemoteSettings` (retries, token,
            concurrency; the trainer builds them from the ``remote_*`` config keys).
        label_column: the column OpenRLHF's ``labels`` come from (then ``answer``).

    Failures raise :class:`RewardError` naming the URL. A failing request is not retried per
    sample (``per_sample_retry = False``): in drop mode the whole batch is dropped for this source.
    """

    per_sample_retry = False
    text_only = True  # gets the rendered prompt strings, never chat messages

    def __init__(self, url: str, timeout: float = 60.0, batch_size: int | None = None, *,
                 settings: RemoteSettings | None = None, label_column: str = "label") -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward needs an http:// or https:// URL, got {url!r}")
        try:
            super().__init__(url, settings or RemoteSettings(timeout=timeout), batch_size=batch_size,
                             label_column=label_column)
        except RemoteError as exc:
            raise RewardError(str(exc)) from None
        self.display_name = f"RemoteReward({url!r})"

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[Any]:
        try:
            return super().__call__(prompts, completions, **columns)
        except RemoteError as exc:
            raise RewardError(str(exc)) from exc


def connect_remote_reward(url: str, settings: RemoteSettings, batch_size: int | None = None) -> RemoteReward:
    """A :class:`RemoteReward` whose server was checked to answer; otherwise a one-line
    :class:`~reinforcepp.remote.RemoteError` naming the URL and the command that starts a server."""
    fn = RemoteReward(url, batch_size=batch_size, settings=settings)
    try:
        fn.check_reachable()
    except RemoteError:
        fn.close()
        raise
    return fn
