"""What the trainer asks of the Megatron models: log-probs, values, and PPO updates.

Each rank works on its training shard (`Shard`, whole prompts; the same on the ranks of one
model-parallel group) and keeps the results there: nothing per-token crosses DP ranks. Losses
are normalised by the counts of the whole mini-batch (tokens or sequences, all-reduced over
DP by the caller), which makes the gradient independent of the TP/PP/DP layout and of the
micro-batch size; metrics are all-reduced scalars. The rollout correction
(`algorithm.rollout_is*`) is computed on each rank's own shard: its weights multiply the policy
loss, and the tokens it rejects leave the actor's loss and those counts. With
`actor.use_dynamic_bsz` every pass runs on packed micro-batches of at most a token budget of real
tokens (packing.py) instead of `*_micro_batch_size_per_gpu` padded rows: the same losses, no
compute on padding.
"""

from __future__ import annotations

import math

import torch

from mcore_rl.algorithms import (
    agg_loss,
    get_policy_loss,
    kl_penalty,
    mismatch_metrics,
    mismatch_sums,
    policy_loss,
    rollout_is_weights,
    value_loss,
)
from mcore_rl.distributed import device as _device
from mcore_rl.distributed.comm import agree, all_reduce, all_reduce_scalars, group_size
from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs
from mcore_rl.trainer.batch import Shard
from mcore_rl.trainer.packing import packed_micro_batches, per_sequence, scatter_rows


def _micro_batches(shard: Shard, rows: range, micro: int, keys, max_tokens: int | None = None,
                   model=None, cols: dict | None = None) -> list[dict]:
    """Padded micro-batches of `micro` rows, or packed ones of at most `max_tokens` real tokens;
    `cols` gives columns (or a loss mask) that replace the shard's own."""
    dev = _device()
    if max_tokens:
        offset = (model.module if hasattr(model, "module") else model).mcore_rl_spec.position_offset
        return packed_micro_batches(shard, rows, max_tokens, keys, dev, offset, cols)
    given = cols or {}
    cols = {k: given[k] if k in given else shard.mask if k == "mask" else getattr(shard, k) for k in keys}
    return [{k: cols[k][i:min(i + micro, rows.stop)].to(dev) for k in keys} for i in range(rows.start, rows.stop, micro)]


@torch.no_grad()
def compute_logprobs(model, shard: Shard, micro: int, with_entropy: bool = False, max_tokens: int | None = None):
    """Per-token log-probs (and entropies) of the shard's `input_ids` under `model`, [N, L-1], on the host
    (zero past each sequence's end when packed)."""
    spec = (model.module if hasattr(model, "module") else model).mcore_rl_spec
    model.eval()

    def fn(logits, mb):
        logp, ent = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size, with_entropy)
        out = {"logp": per_sequence(logp, mb)}
        if with_entropy:
            out["entropy"] = per_sequence(ent, mb)
        return logits.sum() * 0, out

    mbs = _micro_batches(shard, range(len(shard)), micro, ["input_ids"], max_tokens, model)
    out = run_microbatches(model, mbs, fn, forward_only=True)
    model.train()
    logp = _rows(shard, mbs, [o["logp"] for o in out])
    ent = _rows(shard, mbs, [o["entropy"] for o in out]) if with_entropy else None
    return logp, ent


def _rows(shard: Shard, mbs: list[dict], parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-micro-batch results back in the shard's row order, [N, L-1], on the host."""
    if mbs and "rows" in mbs[0]:
        return scatter_rows([(mb["rows"], p.cpu()) for mb, p in zip(mbs, parts)], len(shard), shard.input_ids.shape[1] - 1)
    return torch.cat(parts).cpu()


@torch.no_grad()
def compute_values(critic, shard: Shard, micro: int, max_tokens: int | None = None) -> torch.Tensor:
    critic.eval()
    mbs = _micro_batches(shard, range(len(shard)), micro, ["input_ids"], max_tokens, critic)
    out = run_microbatches(critic, mbs, lambda v, mb: (v.sum() * 0, {"values": per_sequence(v[:, :-1, 0].float(), mb)}),
                           forward_only=True)
    critic.train()
    return _rows(shard, mbs, [o["values"] for o in out])


def _mean_metrics(out: list[dict], dp_group) -> dict[str, float]:
    """Per-token rates (clip fractions, approximate KL) of the whole mini-batch: each micro-batch's
    masked mean weighted by its tokens (`_tokens`), summed over micro-batches and DP ranks. So the
    value does not depend on how rows are grouped into micro-batches (packed or padded) or ranks."""
    keys = [k for k in (out[0] if out else {}) if k != "_tokens"]
    tokens = [float(o["_tokens"]) for o in out]
    sums = [sum(float(o[k]) * t for o, t in zip(out, tokens)) for k in keys] + [sum(tokens)]
    *sums, total = all_reduce_scalars(sums, dp_group)
    return {k: v / max(total, 1.0) for k, v in zip(keys, sums)}


def _step(model, opt, loss_finite: bool = True) -> tuple[bool, float]:
    """Optimizer step unless the loss or the gradient norm is non-finite on any rank, then clear
    the DDP grad buffers; returns (update applied, grad norm).

    The check comes first because megatron only looks for inf/NaN when a loss scaler is in use
    (fp16): in fp32 and bf16 it would clip by a NaN norm and write NaN into every weight.
    """
    opt.prepare_grads()
    grad_norm = opt.get_grad_norm()  # reduced over the model-parallel group; DP grads are reduced
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    ok = not agree(not (loss_finite and math.isfinite(grad_norm)))
    if ok:
        ok, norm, _ = opt.step()
        ok = bool(ok)
        grad_norm = float(norm) if norm is not None else grad_norm
    model.zero_grad_buffer()
    opt.zero_grad()
    return ok, grad_norm


def _finite(out: list[dict], key: str) -> bool:
    return all(math.isfinite(float(o[key])) for o in out)


def mini_batch_denominators(shard: Shard, minis: list[range], agg: str, dp_group,
                            mask: torch.Tensor | None = None) -> list[float]:
    """Each mini-batch's loss denominator over all DP ranks: its valid tokens ("token-mean") or
    its sequences (the "seq-mean-*" modes). One all-reduce for the whole step. `mask` (default
    the response mask) is the loss mask: sequences rejected by the rollout correction drop out."""
    if mask is None:
        if agg != "token-mean":
            return [float(len(rows) * group_size(dp_group)) for rows in minis]
        mask = shard.mask
    per = [mask[rows.start:rows.stop] for rows in minis]
    local = [float(m.sum() if agg == "token-mean" else m.any(-1).sum()) for m in per]
    return [max(c, 1.0) for c in all_reduce_scalars(local, dp_group)]


def rollout_correction(shard: Shard, cfg, dp_group) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """(importance weights, loss mask) of this rank's shard, both None unless
    `algorithm.rollout_is`, and the step's rollout/training mismatch metrics (over DP; none when
    the engine returned no log-probs, `rollout.calculate_log_probs=false`)."""
    if not cfg.actor_rollout_ref.rollout.calculate_log_probs:
        return None, None, {}
    alg = cfg.algorithm
    kw = dict(threshold=alg.rollout_is_threshold, threshold_lower=alg.rollout_is_threshold_lower,
              level=alg.rollout_is_level, mode=alg.rollout_is_mode, veto_threshold=alg.rollout_is_veto_threshold)
    mask = shard.mask
    sums, lo, hi = mismatch_sums(shard.old_logp, shard.rollout_logprobs, mask, **kw)
    sums = all_reduce(sums, dp_group)
    neg_lo, hi = all_reduce(torch.stack([-lo, hi]), dp_group, op="max").unbind()
    metrics = mismatch_metrics(sums, -neg_lo, hi, with_is=True)
    if not alg.rollout_is:
        return None, None, metrics
    weights, keep = rollout_is_weights(shard.old_logp, shard.rollout_logprobs, mask, **kw)
    return weights, keep, metrics


def update_actor(actor, opt, shard: Shard, cfg, minis: list[range], dp_group) -> dict[str, float]:
    """PPO epochs over this rank's part of each mini-batch; returns metrics averaged over all updates."""
    a = cfg.actor_rollout_ref.actor
    spec = actor.module.mcore_rl_spec
    agg = a.loss_agg_mode
    use_kl = a.use_kl_loss and shard.ref_logp is not None
    want_ent = a.entropy_coeff != 0
    # rollout correction: weights in the policy loss; rejected tokens leave the whole actor loss
    is_weights, keep, mismatch = rollout_correction(shard, cfg, dp_group)
    cols = {} if keep is None else {"mask": keep, "is_weights": is_weights}
    keys = ["input_ids", "old_logp", "advantages", "mask"] + (["ref_logp"] if use_kl else []) + \
        (["is_weights"] if cols else [])
    denoms = mini_batch_denominators(shard, minis, agg, dp_group, keep)
    # GSPO always aggregates seq-mean-token-mean: its denominator is the mini-batch's sequence count
    gspo = a.policy_loss == "gspo"
    pg_denoms = mini_batch_denominators(shard, minis, "seq-mean-token-mean", dp_group, keep) if gspo else denoms
    history, bad = [], 0
    norm_len = cfg.data.max_response_length  # Dr.GRPO's constant: the response budget, not the padded length
    for _ in range(a.ppo_epochs):
        for rows, denom, pg_denom in zip(minis, denoms, pg_denoms):

            def fn(logits, mb, denom=denom, pg_denom=pg_denom):
                logp, ent = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size, True)
                logp, ent = per_sequence(logp, mb), per_sequence(ent, mb)
                mask = mb["mask"]
                pg_fn = policy_loss if a.policy_loss == "vanilla" else get_policy_loss(a.policy_loss)
                pg, m = pg_fn(
                    logp, mb["old_logp"], mb["advantages"], mask, clip_low=a.clip_ratio_low,
                    clip_high=a.clip_ratio_high, dual_clip_c=a.clip_ratio_c, agg=agg, denominator=pg_denom,
                    norm_len=norm_len, is_weights=mb.get("is_weights"))
                loss = pg
                ent_loss = agg_loss(ent, mask, agg, denominator=denom, norm_len=norm_len)
                if want_ent:
                    loss = loss - a.entropy_coeff * ent_loss
                metrics = {"actor/pg_loss": pg.detach(), "actor/entropy": ent_loss.detach(),
                           "actor/pg_clipfrac": m["clipfrac"], "actor/ppo_kl": m["approx_kl"], "_tokens": mask.sum()}
                if use_kl:
                    kl = agg_loss(kl_penalty(logp, mb["ref_logp"], a.kl_loss_type), mask, agg, denominator=denom,
                                  norm_len=norm_len)
                    loss = loss + a.kl_loss_coef * kl
                    metrics["actor/kl_loss"] = kl.detach()
                metrics["actor/loss"] = loss.detach()
                return loss, metrics

            out = run_microbatches(actor, _micro_batches(shard, rows, a.ppo_micro_batch_size_per_gpu, keys,
                                                         a.ppo_max_token_len_per_gpu if a.use_dynamic_bsz else None,
                                                         actor, cols), fn)
            ok, grad_norm = _step(actor, opt, _finite(out, "actor/loss"))
            bad += not ok
            names = ("actor/loss", "actor/pg_loss", "actor/entropy") + (("actor/kl_loss",) if use_kl else ())
            local = [float(torch.stack([torch.as_tensor(o[k]) for o in out]).sum()) for k in names]
            summed = dict(zip(names, all_reduce_scalars(local, dp_group)))  # shares of the mini-batch objective
            m = _mean_metrics([{k: v for k, v in o.items() if k not in summed} for o in out], dp_group)
            history.append({**summed, **m, "actor/grad_norm": grad_norm})
    result = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    result["actor/skipped_updates"] = bad
    return {**result, **mismatch}


def update_critic(critic, opt, shard: Shard, cfg, minis: list[range], dp_group) -> dict[str, float]:
    c = cfg.critic
    agg = c.loss_agg_mode
    denoms = mini_batch_denominators(shard, minis, agg, dp_group)
    history, bad = [], 0
    norm_len = cfg.data.max_response_length  # Dr.GRPO's constant: the response budget, not the padded length
    for _ in range(c.ppo_epochs):
        for rows, denom in zip(minis, denoms):

            def fn(v, mb, denom=denom):
                vl, m = value_loss(per_sequence(v[:, :-1, 0].float(), mb), mb["old_values"], mb["returns"], mb["mask"],
                                   clip=c.cliprange_value, agg=agg, denominator=denom, norm_len=norm_len)
                return vl, {"critic/loss": vl.detach(), "critic/vf_clipfrac": m["vf_clipfrac"], "_tokens": mb["mask"].sum()}

            budget = c.ppo_max_token_len_per_gpu if cfg.actor_rollout_ref.actor.use_dynamic_bsz else None
            out = run_microbatches(critic, _micro_batches(shard, rows, c.ppo_micro_batch_size_per_gpu,
                                                          ["input_ids", "old_values", "returns", "mask"], budget,
                                                          critic), fn)
            ok, grad_norm = _step(critic, opt, _finite(out, "critic/loss"))
            bad += not ok
            loss = all_reduce_scalars([float(torch.stack([o["critic/loss"] for o in out]).sum())], dp_group)[0]
            m = _mean_metrics([{k: o[k] for k in ("critic/vf_clipfrac", "_tokens")} for o in out], dp_group)
            history.append({"critic/loss": loss, **m, "critic/grad_norm": grad_norm})
    result = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    result["critic/skipped_updates"] = bad
    return result
