"""Gymnasium control with the same REINFORCE++ core as the language-model trainer.

    from reinforcepp.gym import GymConfig, train
    metrics = train(GymConfig(env_id="CartPole-v1", total_env_steps=100_000))

A response is an episode; its tokens are time steps; there is no reference model (KL
placement ``none``). See ``docs/gym.md``.
"""

from .config import GymConfig
from .policy import Critic, Policy
from .rollout import Collector, RolloutBatch, make_vector_env
from .trainer import GymTrainer, train

__all__ = ["GymConfig", "GymTrainer", "train", "Policy", "Critic", "Collector", "RolloutBatch", "make_vector_env"]
