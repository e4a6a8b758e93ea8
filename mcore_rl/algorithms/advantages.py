"""Advantage estimators: GAE for PPO with a critic, and the critic-free group-relative family.

Shapes: `[B, T]` is batch x response tokens, `mask` is true on response tokens (false on
padding), `scores` is one scalar reward per sample, `group_index` says which prompt a sample was
drawn from (samples of the same prompt share an id). Outputs are zero on padding.

Everything runs under `torch.no_grad()`: advantages are targets, not part of the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mcore_rl.algorithms.utils import GroupIndex, dense_group_ids, masked_whiten


def _group_stats(
    scores: torch.Tensor, group_index: GroupIndex
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group size, group sum, group mean, unbiased group std, score minus group mean),
    all in float64.

    The statistics are taken in float64 and the centred score is exactly 0 in a group whose scores
    are all equal: in float32 the rounding of the group mean leaves a residue of ~1 ulp, which the
    division by (std + eps) with std ~ 1e-7 blows up to an advantage of order 1.
    """
    x = scores.to(torch.float64)
    ids = dense_group_ids(group_index, scores.device)
    n_groups = int(ids.max()) + 1 if ids.numel() else 0
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=scores.device)
    count = zeros.index_add(0, ids, torch.ones_like(x))
    total = zeros.index_add(0, ids, x)
    mean = total / count
    lo = zeros.scatter_reduce(0, ids, x, "amin", include_self=False)
    hi = zeros.scatter_reduce(0, ids, x, "amax", include_self=False)
    equal = (lo == hi)[ids]
    centered = torch.where(equal, torch.zeros_like(x), x - mean[ids])
    sq = zeros.index_add(0, ids, centered.pow(2))
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    return count[ids], total[ids], mean[ids], std[ids], centered


def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), per_sample.unsqueeze(-1), torch.zeros((), dtype=per_sample.dtype,
                                                                            device=per_sample.device))


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (whitened advantages, value targets).

    Masked positions are skipped, not treated as terminal: the recursion carries the next valid
    value and running advantage across them, so tokens the policy did not produce (tool output in
    multi-turn, padding) neither contribute a TD error nor cut the credit chain. The value after the
    last response token is 0 (the episode ends there). Returns are the un-whitened advantages plus
    values, the critic's regression target.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(m, token_rewards.to(values.dtype), zero)
    vals = torch.where(m, values, zero)
    next_value = torch.zeros_like(vals[:, 0])
    running = torch.zeros_like(vals[:, 0])
    adv = torch.zeros_like(vals)
    for t in reversed(range(vals.shape[1])):
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        step = delta + gamma * lam * running
        running = torch.where(m[:, t], step, running)
        next_value = torch.where(m[:, t], vals[:, t], next_value)
        adv[:, t] = running
    returns = torch.where(m, adv + vals, zero)
    return masked_whiten(adv, m, group=group), returns


@torch.no_grad()
def grpo(
    scores: torch.Tensor,
    group_index: GroupIndex,
    mask: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO: score minus its group's mean, divided by the group's (unbiased) std.

    `norm_by_std=False` is Dr.GRPO (no std division, which otherwise up-weights prompts that are
    nearly always solved or nearly always failed). A single-sample group has no baseline, so it
    gets advantage 0 rather than its raw score (verl would pass the raw score through).
    """
    count, _, _, std, adv = _group_stats(scores, group_index)
    if norm_by_std:
        adv = adv / (std + eps)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return _broadcast(adv.to(scores.dtype), mask)


@torch.no_grad()
def rloo(scores: torch.Tensor, group_index: GroupIndex, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: the baseline is the mean score of the *other* samples of the prompt.

    Leaving the sample out keeps the baseline independent of it, so the estimator stays unbiased.
    Equal to n/(n-1) * (score - group mean). Single-sample groups get 0.
    """
    count, _, _, _, centered = _group_stats(scores, group_index)
    # score - mean of the others = n / (n - 1) * (score - group mean), from the exact centring
    adv = torch.where(count > 1, centered * count / (count - 1).clamp(min=1), torch.zeros_like(centered))
    return _broadcast(adv.to(scores.dtype), mask)


@torch.no_grad()
def reinforce_plus_plus(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """REINFORCE++: discounted return-to-go at each token, whitened over the whole batch.

    No critic and no per-prompt baseline: the global whitening plays the baseline's role. Masked
    positions are skipped like in `gae`: their rewards are ignored and the return is carried
    across them, so with multi-turn holes (tool output) earlier turns still see later rewards.
    With right padding only, this is verl's recursion exactly.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=token_rewards.dtype, device=token_rewards.device)
    rewards = torch.where(m, token_rewards, zero)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(m[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return masked_whiten(returns, m, group=group)


@torch.no_grad()
def reinforce_plus_plus_baseline(
    scores: torch.Tensor,
    group_index: GroupIndex,
    mask: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over all valid tokens of the batch.

    The group mean removes per-prompt difficulty; the global (token-weighted) whitening rescales
    without the per-group std division that makes GRPO over-weight near-deterministic prompts.
    A single-sample group's mean is its own score, so it gets 0 before whitening.
    """
    centered = _group_stats(scores, group_index)[4].to(scores.dtype)
    return masked_whiten(_broadcast(centered, mask), mask, group=group)


ADV_ESTIMATORS: dict[str, Callable[..., Any]] = {
    "gae": gae,
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_plus_plus": reinforce_plus_plus,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
}


def compute_advantages(
    name: str,
    *,
    mask: torch.Tensor,
    token_rewards: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    group_index: GroupIndex | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One entry point for the trainer: returns (advantages [B, T], returns [B, T] or None).

    Each estimator takes what it needs. `returns` (the critic target) is only produced by "gae".
    The outcome estimators (grpo, rloo, reinforce_plus_plus_baseline) take one score per sample:
    `scores`, or, as in verl, the sum of `token_rewards` over valid tokens, so that whatever the
    token rewards carry beyond the outcome (a KL-in-reward penalty: score - kl_coef * sum KL)
    reaches them. Give them one of the two, not both: a raw `scores` next to shaped
    `token_rewards` would silently drop the shaping.
    """
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADV_ESTIMATORS)}")

    def need(arg: Any, arg_name: str) -> Any:
        if arg is None:
            raise ValueError(f"advantage estimator {name!r} needs `{arg_name}`")
        return arg

    if name == "gae":
        return gae(need(token_rewards, "token_rewards"), need(values, "values"), mask, gamma, lam,
                   group=group)
    if name == "reinforce_plus_plus":
        return reinforce_plus_plus(need(token_rewards, "token_rewards"), mask, gamma, group=group), None

    if scores is not None and token_rewards is not None:
        raise ValueError(f"advantage estimator {name!r} takes `scores` or `token_rewards`, not both "
                         "(its score is the sum of the token rewards)")
    if scores is None:
        rewards = need(token_rewards, "scores or token_rewards")
        scores = torch.where(mask.bool(), rewards, torch.zeros((), dtype=rewards.dtype,
                                                                device=rewards.device)).sum(-1)
    gi = need(group_index, "group_index")
    if name == "grpo":
        return grpo(scores, gi, mask, norm_by_std=norm_by_std, eps=eps), None
    if name == "rloo":
        return rloo(scores, gi, mask), None
    return reinforce_plus_plus_baseline(scores, gi, mask, group=group), None
