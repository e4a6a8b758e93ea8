"""The few collectives the trainer's data path uses, each safe on NCCL and gloo.

NCCL only moves device tensors (a host tensor crashes it), so every helper copies its input to
`mcore_rl.distributed.device()` first and hands results back where the caller had them. A
`group` of None is the world (as in torch.distributed; pass the DP group for batch-wide sums,
or TP/PP replicas are counted again); with one member (or no process group) nothing is sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _device() -> torch.device:
    from mcore_rl.distributed import device

    return device()


def group_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """All-reduce `t` over `group`; returns the result on `t`'s device and dtype (a new tensor)."""
    if group_size(group) == 1:
        return t.clone()
    x = t.detach().to(_device(), copy=True).contiguous()
    dist.all_reduce(x, op=_OPS[op], group=group)
    return x.to(t.device)


def all_reduce_scalars(values: Sequence[float], group=None, op: str = "sum") -> list[float]:
    """Python floats reduced over `group`, in float64 (one collective for the whole list)."""
    values = [float(v) for v in values]
    if not values or group_size(group) == 1:
        return values
    return all_reduce(torch.tensor(values, dtype=torch.float64), group, op).tolist()


def agree(flag: bool, group=None) -> bool:
    """True on every rank when it is True on any."""
    return all_reduce_scalars([1.0 if flag else 0.0], group, "max")[0] > 0


def exchange(sends: dict[int, torch.Tensor], recv_bytes: dict[int, int]) -> dict[int, torch.Tensor]:
    """Point-to-point: send `sends[peer]` (a flat uint8 tensor) to each peer and receive
    `recv_bytes[peer]` bytes from each; returns the received buffers (host, uint8).

    Both sides must know the sizes (the trainer derives them from the layout), so no size is
    sent. Only the ranks that exchange data take part: this is not a collective."""
    if not sends and not recv_bytes:
        return {}
    dev = _device()
    bufs = {p: torch.empty(n, dtype=torch.uint8, device=dev) for p, n in sorted(recv_bytes.items())}
    ops = [dist.P2POp(dist.isend, t.to(dev).contiguous(), p) for p, t in sorted(sends.items())]
    ops += [dist.P2POp(dist.irecv, b, p) for p, b in bufs.items()]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return {p: b.cpu() for p, b in bufs.items()}
