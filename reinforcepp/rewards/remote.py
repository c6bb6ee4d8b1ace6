"""A reward server over HTTP (JSON) as a reward function. All HTTP code of the reward sources
lives here."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from .base import RewardError


class RemoteReward:
    """A reward server over HTTP (JSON), as a reward function.

    Request: ``POST url`` with body ``{"prompts": [...], "completions": [...], "query":
    [prompt + completion, ...], **columns}`` (``query`` and ``prompts`` as OpenRLHF's remote
    reward model sends them; OpenRLHF's ``labels`` arrive when the dataset column is named
    ``labels``). Response: ``{"rewards": [...]}`` or a plain JSON list, one number per
    completion. With ``batch_size`` the batch is sent in chunks of that many completions.

    A failing request is not retried per sample (``per_sample_retry = False``): in drop mode the
    whole batch is dropped for this source.
    """

    per_sample_retry = False
    text_only = True

    def __init__(self, url: str, timeout: float = 60.0, batch_size: int | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward needs an http:// or https:// URL, got {url!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.url = url
        self.timeout = timeout
        self.batch_size = batch_size
        self.display_name = f"RemoteReward({url!r})"

    def _post(self, payload: dict[str, Any]) -> list[Any]:
        try:
            body = json.dumps(payload).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RewardError(f"remote reward {self.url}: the batch is not JSON-serialisable: {exc}") from exc
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise RewardError(f"remote reward {self.url} answered HTTP {exc.code} {exc.reason}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise RewardError(f"remote reward {self.url} could not be reached: {exc}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RewardError(f"remote reward {self.url} answered non-JSON: {raw[:200]!r}") from exc
        if isinstance(data, dict) and "rewards" in data:
            data = data["rewards"]
        if not isinstance(data, list):
            raise RewardError(
                f"remote reward {self.url} answered {type(data).__name__}; expected {{'rewards': [...]}} or a list"
            )
        return data

    def __call__(self, prompts: list[str], completions: list[str], **columns: list) -> list[Any]:
        n = len(completions)
        step = self.batch_size or max(n, 1)
        rewards: list[Any] = []
        for start in range(0, n, step):
            sl = slice(start, start + step)
            p, c = list(prompts[sl]), list(completions[sl])
            payload = {"prompts": p, "completions": c, "query": [a + b for a, b in zip(p, c)]}
            for key, values in columns.items():
                if key in payload:
                    raise RewardError(f"remote reward {self.url}: column {key!r} clashes with a request field")
                payload[key] = list(values[sl])
            got = self._post(payload)
            if len(got) != len(c):
                raise RewardError(
                    f"remote reward {self.url} returned {len(got)} rewards for {len(c)} completions"
                )
            rewards.extend(got)
        return rewards
