"""RL algorithms in plain PyTorch: advantage estimators, PPO losses, KL estimators, DAPO filters,
rollout/training mismatch correction.

Nothing here knows about Megatron or vLLM: inputs are per-token `[B, T]` tensors plus a mask,
so the same code serves the trainer and the unit tests.
"""

from mcore_rl.algorithms.advantages import (
    ADV_ESTIMATORS,
    compute_advantages,
    gae,
    grpo,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    rloo,
)
from mcore_rl.algorithms.filters import filter_zero_variance_groups, overlong_penalty
from mcore_rl.algorithms.losses import (
    AGG_MODES,
    KL_KINDS,
    POLICY_LOSSES,
    agg_loss,
    apply_kl_in_reward,
    cispo_policy_loss,
    entropy_from_logits,
    get_policy_loss,
    gspo_policy_loss,
    kl_penalty,
    policy_loss,
    value_loss,
)
from mcore_rl.algorithms.rollout_correction import (
    IS_LEVELS,
    IS_MODES,
    mismatch_metrics,
    mismatch_sums,
    rollout_is_weights,
)
from mcore_rl.algorithms.utils import dense_group_ids, masked_mean, masked_sum, masked_whiten

__all__ = [
    "ADV_ESTIMATORS",
    "AGG_MODES",
    "IS_LEVELS",
    "IS_MODES",
    "KL_KINDS",
    "POLICY_LOSSES",
    "agg_loss",
    "apply_kl_in_reward",
    "cispo_policy_loss",
    "compute_advantages",
    "dense_group_ids",
    "entropy_from_logits",
    "filter_zero_variance_groups",
    "gae",
    "get_policy_loss",
    "grpo",
    "gspo_policy_loss",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "mismatch_metrics",
    "mismatch_sums",
    "overlong_penalty",
    "policy_loss",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "rloo",
    "rollout_is_weights",
    "value_loss",
]
