"""A reward server as a reward function (TRL convention), on the shared :class:`RemoteClient`.

Request (one ``POST`` per chunk of ``batch_size`` completions, chunks sent concurrently)::

    {"prompts": [...], "completions": [...], "query": [prompt + completion, ...],
     "labels": [...], <every dataset column>: [...]}

Response: ``{"rewards": [...]}`` (OpenRLHF servers may add ``scores`` and ``extra_logs``,
ignored) or a plain JSON list, one number per completion. ``query``, ``prompts`` and ``labels``
are OpenRLHF's remote reward protocol; ``labels`` come from the ``labels`` column, else
``label_column`` (``label``), else ``answer``, else nulls, so a server written the OpenRLHF way
gets the ground truth it expects.
"""

from __future__ import annotations

from typing import Any

from .client import RemoteClient, RemoteError, RemoteSettings
from .protocol import HEALTH, RESERVED_REWARD_FIELDS, labels_of


class RemoteRewardFunction:
    """``fn(prompts, completions, **columns) -> list`` that asks a reward server.

    Args:
        url: the full endpoint URL the requests are posted to (``http://host:port/rewards`` for
            ``reinforcepp serve reward``; any path for other servers).
        settings: :class:`RemoteSettings`.
        batch_size: completions per request (``None``: the whole batch in one request).
        label_column: the column OpenRLHF's ``labels`` are filled from (then ``answer``).
    """

    per_sample_retry = False  # a failed request is not re-sent one sample at a time
    text_only = True  # gets the rendered prompt strings, never chat messages

    def __init__(
        self, url: str, settings: RemoteSettings | None = None, *, batch_size: int | None = None,
        label_column: str = "label",
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.client = RemoteClient(url, settings or RemoteSettings(), what="reward server")
        self.url = self.client.base_url
        self.batch_size = batch_size
        self.label_column = label_column
        self.__name__ = "remote_reward"
        self.display_name = f"RemoteReward({self.url!r})"

    def check_reachable(self) -> None:
        """Fail early, in one line, when nothing answers at the server's address. Any HTTP
        answer counts (an OpenRLHF server has no ``/health``: a 404 or 405 is fine)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        probe_settings = RemoteSettings(timeout=self.client.settings.timeout, retries=1,
                                        token=self.client.settings.token, backoff=0.2)
        probe = RemoteClient(f"{parts.scheme}://{parts.netloc}", probe_settings, what="reward server")
        try:
            probe.get(HEALTH)
        except RemoteError as exc:
            if "could not be reached" in str(exc) or "no complete answer" in str(exc):
                raise RemoteError(f"reward server {self.url} does not answer; start one with `reinforcepp serve "
                                  f"reward --reward SPEC --port {parts.port or 80}` (see docs/remote.md)") from None
        finally:
            probe.close()

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[Any]:
        n = len(completions)
        step = self.batch_size or max(n, 1)
        for key in columns:
            if key in RESERVED_REWARD_FIELDS and key != "labels":
                raise RemoteError(f"reward server {self.url}: dataset column {key!r} clashes with a request field")
        labels = labels_of(columns, n, self.label_column)
        payloads = []
        for start in range(0, n, step):
            sl = slice(start, start + step)
            p, c = list(prompts[sl]), list(completions[sl])
            payload: dict[str, Any] = {"prompts": p, "completions": c, "query": [a + b for a, b in zip(p, c)],
                                       "labels": labels[sl]}
            payload.update({k: list(v[sl]) for k, v in columns.items() if k != "labels"})
            payloads.append(payload)
        rewards: list[Any] = []
        for payload, answer in zip(payloads, self.client.post_many("", payloads)):
            got = answer["rewards"] if isinstance(answer, dict) and "rewards" in answer else answer
            if not isinstance(got, list):
                raise RemoteError(f"reward server {self.url} answered {type(got).__name__}; "
                                  "expected {'rewards': [...]} or a list")
            if len(got) != len(payload["completions"]):
                raise RemoteError(f"reward server {self.url} returned {len(got)} rewards for "
                                  f"{len(payload['completions'])} completions")
            rewards.extend(got)
        return rewards

    def close(self) -> None:
        self.client.close()

