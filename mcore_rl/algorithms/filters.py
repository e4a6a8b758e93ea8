"""DAPO's batch-level tricks: dynamic sampling (drop uninformative groups) and overlong shaping."""

from __future__ import annotations

import torch

from mcore_rl.algorithms.utils import GroupIndex, dense_group_ids


@torch.no_grad()
def filter_zero_variance_groups(
    scores: torch.Tensor, group_index: GroupIndex, keep_singletons: bool = False
) -> torch.Tensor:
    """Keep mask (bool per sample): false for every sample of a group whose scores are all equal.

    When all n answers to a prompt score the same (all right or all wrong), every group-relative
    advantage is 0: the samples cost compute and dilute the loss without giving any gradient.
    DAPO drops them and samples more prompts. A single-sample group is dropped too (its
    group-relative advantage is 0) unless `keep_singletons`, which is verl's behaviour.
    """
    ids = dense_group_ids(group_index, scores.device)
    n_groups = int(ids.max()) + 1 if ids.numel() else 0
    lo = torch.full((n_groups,), float("inf"), dtype=scores.dtype, device=scores.device)
    hi = torch.full((n_groups,), float("-inf"), dtype=scores.dtype, device=scores.device)
    lo = lo.scatter_reduce(0, ids, scores, reduce="amin")
    hi = hi.scatter_reduce(0, ids, scores, reduce="amax")
    keep = hi > lo
    if keep_singletons:
        count = torch.bincount(ids, minlength=n_groups)
        keep = keep | (count == 1)
    return keep[ids]


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment, a per-sample reward to add to the score.

    0 up to `max_response_length - overlong_buffer_len` tokens, then falling linearly to
    `-penalty_factor` at `max_response_length`. Truncated answers would otherwise be scored
    like wrong ones with no warning as they grow; the ramp tells the policy "getting long" before
    the hard cut. Clamped to [-penalty_factor, 0]; a zero-length buffer disables it.
    """
    lengths = torch.as_tensor(response_lengths).float()
    if overlong_buffer_len <= 0:
        return torch.zeros_like(lengths)
    exceed = lengths - (max_response_length - overlong_buffer_len)
    penalty = -exceed / overlong_buffer_len * penalty_factor
    return penalty.clamp(min=-penalty_factor, max=0.0)
