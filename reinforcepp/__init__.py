"""reinforcepp: REINFORCE++ (critic-free PPO-style policy gradients) for language models and
Gymnasium control. The math lives in :mod:`reinforcepp.core`."""

__version__ = "0.1.0"
