"""Which rank does what: the TP/CP/DP/PP grid of megatron-core plus the rollout (vLLM TP) groups.

Computed here without torch.distributed so that it can be printed before any process group
exists (at start-up, and by `mcore-rl plan` on a laptop). The rank order is megatron-core's
(`parallel_state.RankGenerator`, default order "tp-cp-ep-dp-pp": TP fastest, PP slowest), so
TP groups are contiguous ranks and stay inside a node when TP divides the GPUs per node;
tests check the groups against megatron-core's own generator.

Rollout groups: with vLLM's `external_launcher`, each rollout engine spans `rollout_tp`
consecutive global ranks, so rollout TP groups are [0..r-1], [r..2r-1], ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mcore_rl.distributed.env import LaunchEnv

__all__ = ["RankCoord", "Layout", "rank_layout", "describe_layout", "DEFAULT_ORDER"]

DEFAULT_ORDER = "tp-cp-ep-dp-pp"
_KNOWN = ("tp", "cp", "ep", "dp", "pp")


@dataclass(frozen=True)
class RankCoord:
    rank: int
    tp: int
    cp: int
    dp: int
    pp: int
    rollout_tp: int  # rank inside its rollout (vLLM TP) group
    rollout_dp: int  # which rollout engine


@dataclass(frozen=True)
class Layout:
    """The parallel grid. Group lists are in megatron-core's order; every rank is in exactly
    one group of each kind."""

    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    rollout_tp: int
    rollout_dp: int
    order: str
    coords: tuple[RankCoord, ...]
    tp_groups: tuple[tuple[int, ...], ...]
    pp_groups: tuple[tuple[int, ...], ...]
    dp_groups: tuple[tuple[int, ...], ...]
    cp_groups: tuple[tuple[int, ...], ...]
    dp_cp_groups: tuple[tuple[int, ...], ...]  # what the distributed optimizer shards over
    rollout_groups: tuple[tuple[int, ...], ...]

    def coord(self, rank: int) -> RankCoord:
        return self.coords[rank]

    def _find(self, groups, rank: int) -> tuple[int, ...]:
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} not in layout of world_size {self.world_size}")

    def tp_group(self, rank: int) -> tuple[int, ...]:
        return self._find(self.tp_groups, rank)

    def pp_group(self, rank: int) -> tuple[int, ...]:
        return self._find(self.pp_groups, rank)

    def dp_group(self, rank: int) -> tuple[int, ...]:
        return self._find(self.dp_groups, rank)

    def cp_group(self, rank: int) -> tuple[int, ...]:
        return self._find(self.cp_groups, rank)

    def rollout_group(self, rank: int) -> tuple[int, ...]:
        return self._find(self.rollout_groups, rank)


def _parse_order(order: str, sizes: dict[str, int]) -> list[str]:
    tokens = order.lower().split("-")
    bad = [t for t in tokens if t not in _KNOWN]
    if bad or len(set(tokens)) != len(tokens):
        raise ValueError(f"order {order!r}: expected distinct tokens from {_KNOWN}")
    for name, size in sizes.items():
        if name not in tokens:
            if size != 1:
                raise ValueError(f"order {order!r} does not name {name!r} but its size is {size}")
            tokens.append(name)  # as megatron-core does: a missing size-1 dimension goes last
    return tokens


def _groups(world_size: int, tokens: list[str], sizes: dict[str, int], along: set[str]) -> tuple[tuple[int, ...], ...]:
    """Ranks that differ only in the dimensions `along`. Rank = sum(coord_d * stride_d) with
    strides growing in `tokens` order; groups are listed by their smallest rank and each is
    ascending, which is megatron-core's enumeration."""
    strides, s = {}, 1
    for t in tokens:
        strides[t] = s
        s *= sizes[t]
    buckets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world_size):
        key = tuple((rank // strides[t]) % sizes[t] for t in tokens if t not in along)
        buckets.setdefault(key, []).append(rank)
    return tuple(sorted((tuple(g) for g in buckets.values()), key=lambda g: g[0]))


def rank_layout(world_size: int, tp: int, pp: int, cp: int = 1, rollout_tp: int | None = None,
                order: str = DEFAULT_ORDER) -> Layout:
    """The TP/CP/DP/PP coordinate of every rank and the rank lists of each group.

    DP is what is left: world_size / (tp * cp * pp). `rollout_tp` defaults to `tp`.
    Raises ValueError with the reason when the sizes do not tile the world.
    """
    for name, v in (("world_size", world_size), ("tensor parallel size (tp)", tp),
                    ("pipeline parallel size (pp)", pp), ("context parallel size (cp)", cp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world_size {world_size} is not divisible by tp*cp*pp = {tp}*{cp}*{pp} = {model_parallel}; "
            f"use a world size that is a multiple of {model_parallel} or change tp/pp/cp"
        )
    dp = world_size // model_parallel
    rtp = tp if rollout_tp is None else rollout_tp
    if not isinstance(rtp, int) or rtp < 1:
        raise ValueError(f"rollout tensor parallel size must be a positive integer, got {rtp!r}")
    if world_size % rtp:
        raise ValueError(
            f"rollout tensor parallel size {rtp} does not divide world_size {world_size}: "
            f"every rank must belong to exactly one rollout engine"
        )

    sizes = {"tp": tp, "cp": cp, "ep": 1, "dp": dp, "pp": pp}
    tokens = _parse_order(order, sizes)
    strides, s = {}, 1
    for t in tokens:
        strides[t] = s
        s *= sizes[t]

    coords = tuple(
        RankCoord(rank=r, **{t: (r // strides[t]) % sizes[t] for t in ("tp", "cp", "dp", "pp")},
                  rollout_tp=r % rtp, rollout_dp=r // rtp)
        for r in range(world_size)
    )
    rollout_groups = tuple(tuple(range(i, i + rtp)) for i in range(0, world_size, rtp))
    return Layout(
        world_size=world_size, tp=tp, pp=pp, cp=cp, dp=dp, rollout_tp=rtp, rollout_dp=world_size // rtp,
        order="-".join(tokens), coords=coords,
        tp_groups=_groups(world_size, tokens, sizes, {"tp"}),
        pp_groups=_groups(world_size, tokens, sizes, {"pp"}),
        dp_groups=_groups(world_size, tokens, sizes, {"dp"}),
        cp_groups=_groups(world_size, tokens, sizes, {"cp"}),
        dp_cp_groups=_groups(world_size, tokens, sizes, {"dp", "cp"}),
        rollout_groups=rollout_groups,
    )


def _fmt_group(g: tuple[int, ...]) -> str:
    if len(g) > 2 and all(b - a == 1 for a, b in zip(g, g[1:])):
        return f"[{g[0]}-{g[-1]}]"
    return "[" + ",".join(map(str, g)) + "]"


def _fmt_groups(groups, node_ranks: set[int]) -> str:
    """Groups touching this node; a '*' marks a group that spans other nodes too."""
    touched = [g for g in groups if node_ranks.intersection(g)]
    return " ".join(_fmt_group(g) + ("" if node_ranks.issuperset(g) else "*") for g in touched)


def _node_of_ranks(layout: Layout, env: "LaunchEnv") -> list[list[int]]:
    """Ranks on each node, assuming block placement (node n holds ranks n*L .. n*L+L-1), which
    is what torchrun and srun's default block distribution give."""
    nodes = max(1, env.num_nodes)
    if layout.world_size % nodes:
        raise ValueError(f"world_size {layout.world_size} is not divisible by {nodes} nodes")
    per = layout.world_size // nodes
    return [list(range(n * per, (n + 1) * per)) for n in range(nodes)]


def describe_layout(layout: Layout, env: "LaunchEnv") -> list[str]:
    """Human-readable layout: a summary line, then one line per node listing its ranks and the
    TP / PP / DP / rollout groups they belong to (groups marked '*' cross to other nodes,
    which for TP and rollout TP usually means a slow, inter-node all-reduce)."""
    lines = [
        f"layout: world={layout.world_size} = tp {layout.tp} x cp {layout.cp} x dp {layout.dp} x pp {layout.pp} "
        f"(order {layout.order}); rollout: {layout.rollout_dp} engine(s) of tp {layout.rollout_tp}; "
        f"{env.num_nodes} node(s) x {layout.world_size // max(1, env.num_nodes)} rank(s)"
    ]
    warn = []
    for n, ranks in enumerate(_node_of_ranks(layout, env)):
        rs = set(ranks)
        host = f" ({env.hostnames[n]})" if n < len(env.hostnames) else ""
        parts = [f"node {n}{host}: ranks {_fmt_group(tuple(ranks))}",
                 f"TP {_fmt_groups(layout.tp_groups, rs)}",
                 f"PP {_fmt_groups(layout.pp_groups, rs)}",
                 f"DP {_fmt_groups(layout.dp_groups, rs)}"]
        if layout.cp > 1:
            parts.append(f"CP {_fmt_groups(layout.cp_groups, rs)}")
        parts.append(f"rollout TP {_fmt_groups(layout.rollout_groups, rs)}")
        lines.append(" | ".join(parts))
        for kind, groups in (("TP", layout.tp_groups), ("rollout TP", layout.rollout_groups)):
            if any(rs.intersection(g) and not rs.issuperset(g) for g in groups) and kind not in warn:
                warn.append(kind)
    for kind in warn:
        lines.append(f"warning: {kind} groups span nodes (marked *): their all-reduces go over the network")
    return lines
