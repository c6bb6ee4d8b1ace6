"""Reward sources for language-model training: one signature, loaded from a spec string, scored
and validated in one place.

Every reward source is a function in the TRL convention::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

called with keyword arguments. ``columns`` are the extra dataset columns of the batch (say
``answer``), each a list aligned with ``completions``; a function receives only the columns it
names as parameters, or all of them when it takes ``**kwargs``. It returns one finite float per
completion (the scalar ``rewards`` of the responses).

:class:`RewardScorer` calls every :class:`RewardSource`, checks each output (length, ``None``,
NaN/inf, exceptions, each error naming the source and the sample index) and combines them:

    ``rewards_i = sum_s weight_s * r_s,i``    shape ``(N,)``, ``N = len(completions)``.

Sources come from spec strings (:func:`load_reward_source`): ``module.sub:function``,
``path/to/file.py:function``, ``verl:<module-or-file>[:compute_score]``,
``openrlhf:<module-or-file>[:reward_func]``, ``rm:<path-or-hub-name>`` (a sequence-classification
reward model, :class:`RewardModel`) and ``http(s)://...`` (a reward server, :class:`RemoteReward`).
docs/lm.md ("Rewards") documents the protocols.

Modules, one per seam: :mod:`.base` (types and errors), :mod:`.calling` (the calling convention
and output validation), :mod:`.scoring` (the scorer), :mod:`.adapters` (verl, OpenRLHF),
:mod:`.reward_model`, :mod:`.remote` (HTTP), :mod:`.loading` (spec strings).
"""

from .adapters import from_openrlhf, from_verl
from .base import (
    RESERVED_ARGUMENTS,
    OnError,
    RewardConfigError,
    RewardError,
    RewardFn,
    RewardResult,
    RewardSource,
    RewardExitError,
    RewardTimeoutError,
    TrainerState,
)
from .calling import RewardBatch, call_reward_function, check_columns, reward_kwargs
from .loading import load_reward_function, load_reward_source
from .remote import RemoteReward
from .reward_model import RewardModel
from .scoring import RewardScorer

__all__ = [
    "RESERVED_ARGUMENTS",
    "OnError",
    "RemoteReward",
    "RewardBatch",
    "RewardConfigError",
    "RewardError",
    "RewardFn",
    "RewardModel",
    "RewardResult",
    "RewardScorer",
    "RewardSource",
    "RewardExitError",
    "RewardTimeoutError",
    "TrainerState",
    "call_reward_function",
    "check_columns",
    "from_openrlhf",
    "from_verl",
    "load_reward_function",
    "load_reward_source",
    "reward_kwargs",
]
