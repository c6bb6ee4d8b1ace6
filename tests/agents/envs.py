"""Small deterministic environments for the multi-turn tests."""

from __future__ import annotations

import math


class TwoTurnEnv:
    """Turn 1 gets the observation ``" ab "``; turn 2 ends the episode with reward = the
    fraction of 'a' in it (plus ``turn_reward`` for turn 1, a per-turn reward)."""

    turn_reward = 0.0

    def __init__(self) -> None:
        self.turn = 0

    def reset(self, row):
        self.turn = 0

    def step(self, text):
        self.turn += 1
        if self.turn == 1:
            return " ab ", self.turn_reward, False, {"calls": 1}
        return "", text.count("a") / max(1, len(text)), True


class TurnRewardEnv(TwoTurnEnv):
    turn_reward = 0.5


class AsyncTwoTurnEnv(TwoTurnEnv):
    async def reset(self, row):
        return super().reset(row)

    async def step(self, text):
        return super().step(text)


class BadObservationEnv(TwoTurnEnv):
    def step(self, text):
        self.turn += 1
        return (123, 0.0, False) if self.turn == 2 else (" ab ", 0.0, False)


class NaNRewardEnv(TwoTurnEnv):
    def step(self, text):
        return "", math.nan, True
