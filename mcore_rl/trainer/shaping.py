"""From the engines' samples to this rank's training shard.

Engines decide about their own prompts (DAPO's overlong penalty and dynamic sampling, token
counts for DP balancing) and one all-reduce of per-prompt flags or counts makes every rank agree
on the step's prompt order. Each rank then gathers the samples of its part of that order from
the engines that generated them (point-to-point, sizes known from the layout; nothing moves when
its own engine generated them).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from mcore_rl.algorithms import filter_zero_variance_groups, overlong_penalty
from mcore_rl.distributed import comm
from mcore_rl.trainer.batch import Shard
from mcore_rl.trainer.packing import balance_order, dp_imbalance, sequence_lengths


def penalise_overlong(local: Shard, cfg: DictConfig) -> None:
    """DAPO's soft overlong penalty, added to the scores of responses near the length limit."""
    ob = cfg.algorithm.overlong_buffer
    if ob.enable:
        local.scores = local.scores + overlong_penalty(local.response_length.float(), cfg.data.max_response_length,
                                                       ob.len, ob.penalty_factor)


def keep_varied_groups(local: Shard, batch_size: int, mini: int, leads_engine: bool) -> tuple[list[int], float]:
    """DAPO dynamic sampling: the prompts whose samples' scores differ, trimmed to whole
    mini-batches (sizes must stay divisible), and the fraction kept. Collective."""
    keep = filter_zero_variance_groups(local.scores, local.prompt_index)
    flags = torch.zeros(batch_size)
    if leads_engine:
        flags[local.prompt_index[keep]] = 1.0
    kept = comm.all_reduce(flags).nonzero().squeeze(1).tolist()
    whole = (len(kept) // mini) * mini
    if whole == 0:
        raise RuntimeError("dynamic sampling dropped every group this step (all rewards equal per prompt)")
    return kept[:whole], len(kept) / batch_size


def balance(local: Shard, order: list[int], batch_size: int, mini: int, layout) -> tuple[list[int], float]:
    """`order` with each mini-batch's prompts dealt over DP ranks by tokens (packing.balance_order),
    and the DP imbalance left; engines count their own prompts' tokens, one all-reduce agrees."""
    tokens = torch.zeros(batch_size)
    if layout.leads_engine and len(local):
        tokens.index_add_(0, local.prompt_index, sequence_lengths(local).float())
    tokens = comm.all_reduce(tokens).tolist()
    order = balance_order(order, tokens, mini, layout.dp)
    return order, dp_imbalance(order, tokens, mini, layout.dp)


def prompt_order(local: Shard, batch_size: int, cfg: DictConfig, layout) -> tuple[list[int], dict]:
    """The step's training order of prompts after the overlong penalty, dynamic sampling and DP
    token balancing (each as configured), with their metrics. Collective."""
    a, metrics = cfg.actor_rollout_ref, {}
    mini = a.actor.ppo_mini_batch_size
    penalise_overlong(local, cfg)
    order = list(range(batch_size))
    if cfg.algorithm.filter_groups.enable:
        order, metrics["filter/kept_fraction"] = keep_varied_groups(local, batch_size, mini, layout.leads_engine)
    if a.actor.use_dynamic_bsz and layout.dp > 1:
        order, metrics["perf/dp_token_imbalance"] = balance(local, order, batch_size, mini, layout)
    return order, metrics


def training_shard(local: Shard, order: list[int], layout, mini: int, n: int) -> Shard:
    """This rank's training shard: its prompts of `order`, from its own engine's samples and
    those its peers send (the layout's exchange; nothing moves when the shard is local)."""
    seq_len = local.input_ids.shape[1]
    recv, send = layout.prompt_exchange(order, mini)
    got = comm.exchange({dst: local.take_prompts(ps).to_bytes() for dst, ps in send.items()},
                        {src: Shard.wire_bytes(len(ps) * n, seq_len) for src, ps in recv.items()})
    parts = [local] + [Shard.from_bytes(got[src], len(ps) * n, seq_len) for src, ps in recv.items()]
    shard = Shard.cat(parts).take_prompts(layout.train_shard(order, mini))
    if len(shard) != len(order) * n // layout.dp:
        raise RuntimeError(f"rank {layout.rank}: training shard has {len(shard)} samples, expected "
                           f"{len(order) * n // layout.dp}")
    return shard
