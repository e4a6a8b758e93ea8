"""Masked reductions shared by the advantage estimators and the losses.

Every reduction here selects valid positions with `torch.where` rather than multiplying by the
mask, so a NaN or inf sitting in a padded slot (uninitialised buffers, log-probs of pad tokens)
can never reach a valid result.

In the SPMD execution model there is no driver holding the whole batch: each data-parallel rank
holds a shard. Statistics that verl takes over the full batch (advantage whitening) take a
`group` argument; with a process group they are all-reduced so every rank whitens with the same
batch-wide mean and variance (two scalar all-reduces).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

GroupIndex = torch.Tensor | Sequence[Any]


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over `group` (None: this rank alone), through the device the backend needs."""
    if group is None:
        return t
    from mcore_rl.distributed.comm import all_reduce

    return all_reduce(t, group)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is true (over all elements, or along `dim`)."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over valid positions; 0 where there are none (never NaN)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Normalise `x` to zero mean, unit variance over valid positions; padding comes back as 0.

    The variance is unbiased (Bessel-corrected), as in verl. With `shift_mean=False` the mean is
    added back, so only the scale changes. With `group`, mean and variance are taken over the
    valid positions of every rank in the group.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x = torch.where(m, x, zero)
    stats = torch.stack([x.sum(), m.sum().to(x.dtype)])
    total, count = _all_reduce(stats, group).unbind()
    mean = total / count.clamp(min=1)
    centered = torch.where(m, x - mean, zero)
    sq = _all_reduce(centered.pow(2).sum(), group)
    var = sq / (count - 1).clamp(min=1)
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero)


def dense_group_ids(group_index: GroupIndex, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense ids 0..G-1 from int ids (tensor, list, numpy) or any hashable ids (e.g. uuid strings)."""
    if not isinstance(group_index, torch.Tensor):
        try:
            group_index = torch.as_tensor(group_index)
        except (TypeError, ValueError, RuntimeError):
            seen: dict[Any, int] = {}
            group_index = torch.tensor([seen.setdefault(g, len(seen)) for g in group_index])
    _, inverse = torch.unique(group_index.to(device) if device is not None else group_index,
                              return_inverse=True)
    return inverse
