"""The pure, torch-only core of REINFORCE++ and its sibling estimators.

Importing this package imports torch and nothing else of weight: no transformers, datasets,
gymnasium or vllm, and it never initialises ``torch.distributed``. The math lives here; the
trainers only move tensors in and out (see ``docs/algorithms.md``).
"""

from .advantages import (
    ESTIMATORS,
    AdvantageInputs,
    AdvantageParams,
    Advantages,
    SCALE_REWARDS,
    EstimatorSpec,
    compute_advantages,
    get_estimator,
    register_estimator,
    scaled_group_advantages,
)
from .correction import (
    CORRECTION_LEVELS,
    CORRECTION_MODES,
    CorrectionLevel,
    CorrectionMode,
    RolloutCorrection,
    check_rollout_correction,
    correction_stats,
    rollout_correction,
    staleness_stats,
)
from .importance import logprob_mismatch, truncated_importance_weights
from .kl import KL_ESTIMATORS, KL_PLACEMENTS, KLEstimatorName, KLPlacement, check_kl_placement, kl_penalty
from .kl_control import AdaptiveKLController, FixedKLController, mix_reference
from .losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    CovPolicyLoss,
    ImportanceSamplingLevel,
    POLICY_LOSSES,
    PolicyLoss,
    PolicyLossName,
    PolicyLossParams,
    compute_policy_loss,
    cispo_loss,
    clip_cov_loss,
    importance_log_ratio,
    kl_cov_loss,
    policy_loss,
    token_covariance,
)
from .objective import (
    LOSS_AGGS,
    LossAgg,
    TokenLoss,
    aggregate,
    entropy_from_logits,
    kl_loss,
    token_loss,
    truncated_loss_mask,
    value_loss,
)
from .natural import (
    LineSearch,
    backtracking_line_search,
    categorical_kl,
    conjugate_gradient,
    diagonal_gaussian_kl,
    fisher_vector_product,
    flat_grad,
    flat_params,
    scale_to_kl_radius,
    set_flat_params,
)
from .metrics import advantage_stats, approx_kl, clip_fractions, group_reward_stats, kl_return_share, pass_at_k
from .returns import discounted_returns, discounted_returns_loop, gae, gae_loop
from .shaping import (
    clip_rewards,
    distillation_token_rewards,
    group_mean_baseline,
    group_normalize,
    last_token_index,
    leave_one_out_baseline,
    overlong_penalty,
    token_rewards,
    truncation_penalty,
)
from .stats import (
    Reduce,
    all_reduce_sum,
    masked_mean,
    masked_mean_var,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_whiten,
)

__all__ = [name for name in dir() if not name.startswith("_")]
