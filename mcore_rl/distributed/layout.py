"""Which rank does what: the TP/CP/DP/PP grid of megatron-core plus the rollout (vLLM TP) groups.

Computed here without torch.distributed so that it can be printed before any process group
exists (at start-up, and by `mcore-rl plan` on a laptop). The rank order is megatron-core's
(`parallel_state.RankGenerator`, default order "tp-cp-ep-dp-pp": TP fastest, PP slowest), so
TP groups are contiguous ranks and stay inside a node when TP divides the GPUs per node;
tests check the groups against megatron-core's own generator.

Rollout groups: with vLLM's `external_launcher`, each rollout engine spans `rollout_tp`
consecutive global ranks, so rollout TP groups are [0..r-1], [r..2r-1], ...

The step's batch (built once per `Layout`, asked by the trainer, the rollout and the updates):
with M prompts per mini-batch, DP rank d trains, in every mini-batch i, on the prompts
[i*M + d*M/DP, i*M + (d+1)*M/DP), so mini-batch i holds the same prompts at every layout.
Rollout engines split each mini-batch the same way into RDP = world / rollout_tp slots. Which
engine fills which slot is chosen so that a rank's training shard is generated inside its own
model-parallel (TP x PP) group: engines are ranked by the (dp, pp, tp) coordinate of their
first rank. With PP=1 and rollout_tp a multiple of TP, an engine's slot then contains the
shard of each of its ranks (nothing to move). With rollout_tp < TP, or PP > 1, a shard is the
union of slots of engines that live in its model-parallel group, and `shard_source` names the
peer there that sends each missing prompt, provided engines line up with the grid (rollout_tp
divides TP, or is a multiple of TP that divides TP*DP or is a multiple of it); otherwise the
sender may sit in another DP group (still correct, more traffic). The n samples of a prompt
always stay together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from mcore_rl.distributed.env import LaunchEnv

__all__ = ["RankCoord", "Layout", "rank_layout", "describe_layout", "DEFAULT_ORDER"]

from collections.abc import Sequence

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
    engine_of_slot: tuple[int, ...] = ()  # the rollout engine that generates each slot of a mini-batch
    rank: int = 0  # the rank this process is (the grid itself is the same on every rank)

    def coord(self, rank: int) -> RankCoord:
        return self.coords[rank]

    # ------------------------------------------------------------ this rank
    @property
    def me(self) -> RankCoord:
        return self.coords[self.rank]

    @property
    def reports(self) -> bool:
        """The one rank that prints and writes metrics."""
        return self.rank == 0

    @property
    def leads_engine(self) -> bool:
        """First rank of its rollout engine: the one whose samples count in batch-wide sums."""
        return self.me.rollout_tp == 0

    def checkpoint_key(self) -> dict[str, int]:
        """What a checkpoint records to tell whether RNG states can be restored."""
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world": self.world_size}

    # ------------------------------------------------------------ the step's batch
    def _check_mini(self, mini: int) -> None:
        if mini < 1 or mini % self.dp:
            raise ValueError(f"ppo_mini_batch_size={mini} must be divisible by DP={self.dp}")

    def engine_of_prompt(self, prompt: int, mini: int) -> int:
        """The rollout engine that generates prompt `prompt` (index in the step's batch). Slot s of
        a mini-batch is offsets [floor(s*M/RDP), floor((s+1)*M/RDP)): as even as M allows, and
        never across a DP shard's edge when RDP is a multiple of DP."""
        self._check_mini(mini)
        r = self.rollout_dp
        return self.engine_of_slot[((prompt % mini + 1) * r + mini - 1) // mini - 1]

    def rollout_slice(self, batch_size: int, mini: int, rank: int | None = None) -> list[int]:
        """Indices (in the step's batch) of the prompts `rank`'s engine generates, ascending
        (empty for an engine without a slot when a mini-batch has fewer prompts than engines)."""
        self._check_mini(mini)
        if batch_size % mini:
            raise ValueError(f"batch of {batch_size} prompts is not a multiple of ppo_mini_batch_size={mini}")
        engine = self.coords[self.rank if rank is None else rank].rollout_dp
        slot, r = self.engine_of_slot.index(engine), self.rollout_dp
        lo, hi = slot * mini // r, (slot + 1) * mini // r
        return [i + k for i in range(0, batch_size, mini) for k in range(lo, hi)]

    def train_shard(self, order: Sequence[int], mini: int, rank: int | None = None) -> list[int]:
        """The prompts `rank` trains on, in training order. `order` is the step's prompt order
        (all prompts, or those dynamic sampling kept), a multiple of `mini` long; mini-batch i
        is order[i*mini:(i+1)*mini] and this rank's DP coordinate picks its contiguous part."""
        self._check_mini(mini)
        if len(order) % mini:
            raise ValueError(f"{len(order)} prompts is not a multiple of ppo_mini_batch_size={mini}")
        d, per = self.coords[self.rank if rank is None else rank].dp, mini // self.dp
        return [p for i in range(0, len(order), mini) for p in order[i + d * per:i + (d + 1) * per]]

    def shard_source(self, prompt: int, mini: int, rank: int | None = None) -> int | None:
        """The rank that sends `prompt`'s samples to `rank`, or None when `rank`'s own engine
        generated it. The sender is the peer at `rank`'s position inside the generating engine:
        for the shards of an undisturbed batch that peer is in `rank`'s model-parallel group."""
        rank = self.rank if rank is None else rank
        engine = self.engine_of_prompt(prompt, mini)
        if engine == self.coords[rank].rollout_dp:
            return None
        return self.rollout_groups[engine][self.coords[rank].rollout_tp]

    def prompt_exchange(self, order: Sequence[int], mini: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """What this rank receives and sends to build every training shard from the engines'
        outputs: ({source rank: prompts}, {destination rank: prompts}), each list in the
        receiver's training order. Every rank computes the same exchange for its peers."""
        recv: dict[int, list[int]] = {}
        for p in self.train_shard(order, mini):
            src = self.shard_source(p, mini)
            if src is not None:
                recv.setdefault(src, []).append(p)
        send: dict[int, list[int]] = {}
        me = self.me
        for dst in range(me.rollout_tp, self.world_size, self.rollout_tp):  # peers at my place in their engine
            if self.coords[dst].rollout_dp == me.rollout_dp:
                continue
            mine = [p for p in self.train_shard(order, mini, dst) if self.engine_of_prompt(p, mini) == me.rollout_dp]
            if mine:
                send[dst] = mine
        return recv, send

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
                order: str = DEFAULT_ORDER, rank: int = 0) -> Layout:
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
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    first = [coords[g[0]] for g in rollout_groups]
    engine_of_slot = tuple(sorted(range(len(first)), key=lambda e: (first[e].dp, first[e].cp, first[e].pp, first[e].tp)))
    return Layout(
        world_size=world_size, tp=tp, pp=pp, cp=cp, dp=dp, rollout_tp=rtp, rollout_dp=world_size // rtp,
        order="-".join(tokens), coords=coords,
        tp_groups=_groups(world_size, tokens, sizes, {"tp"}),
        pp_groups=_groups(world_size, tokens, sizes, {"pp"}),
        dp_groups=_groups(world_size, tokens, sizes, {"dp"}),
        cp_groups=_groups(world_size, tokens, sizes, {"cp"}),
        dp_cp_groups=_groups(world_size, tokens, sizes, {"dp", "cp"}),
        rollout_groups=rollout_groups, engine_of_slot=engine_of_slot, rank=rank,
    )


def _fmt_group(g: tuple[int, ...]) -> str:
    if len(g) > 2 and all(b - a == 1 for a, b in zip(g, g[1:])):
        return f"[{g[0]}-{g[-1]}]"
    return "[" + ",".join(map(str, g)) + "]"


def _fmt_groups(groups, node_ranks: set[int]) -> str:
    """Groups touching this node; a '*' marks a group that spans other nodes too."""
    touched = [g for g in groups if node_ranks.intersection(g)]
    return " ".join(_fmt_group(g) + ("" if node_ranks.issuperset(g) else "*") for g in touched)


def _node_of_ranks(world_size: int, env: "LaunchEnv") -> list[list[int]]:
    """Ranks on each node, assuming block placement (node n holds ranks n*L .. n*L+L-1), which
    is what torchrun and srun's default block distribution give."""
    nodes = max(1, env.num_nodes)
    if world_size % nodes:
        raise ValueError(f"world_size {world_size} is not divisible by {nodes} nodes")
    per = world_size // nodes
    return [list(range(n * per, (n + 1) * per)) for n in range(nodes)]


def describe_layout(layout: Layout, env: "LaunchEnv",
                    rollout_groups: Sequence[tuple[int, ...]] | None = None) -> list[str]:
    """Human-readable layout: a summary line, then one line per node listing its ranks and the
    TP / PP / DP / rollout groups they belong to (groups marked '*' cross to other nodes,
    which for TP and rollout TP usually means a slow, inter-node all-reduce).

    Split placement: `layout` is the training ranks' grid (the job's first ranks) and
    `rollout_groups` the job ranks of each rollout engine (the ranks after them); the summary
    then has a line per side, and a node's line names only the groups its ranks are in."""
    split = rollout_groups is not None
    engines = tuple(rollout_groups) if split else layout.rollout_groups
    world = layout.world_size + (sum(map(len, engines)) if split else 0)
    nodes = max(1, env.num_nodes)
    grid = f"tp {layout.tp} x cp {layout.cp} x dp {layout.dp} x pp {layout.pp} (order {layout.order})"
    if split:
        rtp = len(engines[0]) if engines else 0
        lines = [f"layout: split placement, {world} ranks; {nodes} node(s) x {world // nodes} rank(s)",
                 f"  training ranks {_fmt_group(tuple(range(layout.world_size)))}: {grid}",
                 f"  rollout ranks {_fmt_group(tuple(range(layout.world_size, world)))}: {len(engines)} engine(s) "
                 f"of tp {rtp}: " + " ".join(map(_fmt_group, engines))]
    else:
        lines = [f"layout: world={layout.world_size} = {grid}; rollout: {layout.rollout_dp} engine(s) of tp "
                 f"{layout.rollout_tp}; {nodes} node(s) x {layout.world_size // nodes} rank(s)"]
    warn = []
    for n, ranks in enumerate(_node_of_ranks(world, env)):
        rs = set(ranks)
        host = f" ({env.hostnames[n]})" if n < len(env.hostnames) else ""
        kinds = [("TP", layout.tp_groups), ("PP", layout.pp_groups), ("DP", layout.dp_groups)]
        if layout.cp > 1:
            kinds.append(("CP", layout.cp_groups))
        kinds.append(("rollout TP", engines))
        parts = [f"node {n}{host}: ranks {_fmt_group(tuple(ranks))}"]
        parts += [f"{kind} {groups}" for kind, g in kinds if (groups := _fmt_groups(g, rs))]
        lines.append(" | ".join(parts))
        for kind, groups in (("TP", layout.tp_groups), ("rollout TP", engines)):
            if any(rs.intersection(g) and not rs.issuperset(g) for g in groups) and kind not in warn:
                warn.append(kind)
    for kind in warn:
        lines.append(f"warning: {kind} groups span nodes (marked *): their all-reduces go over the network")
    return lines
