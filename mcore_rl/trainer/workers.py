"""What the trainer asks of the Megatron models: log-probs, values, and PPO updates.

Every rank holds the whole rollout batch (it is small: token ids and per-token floats).
Each DP rank works on its contiguous slice; forward results are all-gathered over DP so
that advantages are computed on the global batch identically on every rank. Losses are
normalised by global counts (tokens or sequences of the whole mini-batch), which makes the
gradient independent of the TP/PP/DP layout and of the micro-batch size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mcore_rl.algorithms import agg_loss, kl_penalty, policy_loss, value_loss
from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs


def _dp():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), ps.get_data_parallel_group()


def _micro_batches(batch: dict, rows: range, micro: int, keys) -> list[dict]:
    dev = _device()
    return [{k: batch[k][i:min(i + micro, rows.stop)].to(dev) for k in keys} for i in range(rows.start, rows.stop, micro)]


def _device():
    from mcore_rl.distributed import device

    return device()


def _gather_dp(local: torch.Tensor) -> torch.Tensor:
    dp, _, group = _dp()
    if dp == 1:
        return local
    local = local.to(_device())  # the metrics come back on the host; NCCL only moves device tensors
    out = torch.empty((dp * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local.contiguous(), group=group)
    return out.cpu()


def _my_rows(n: int) -> range:
    dp, rank, _ = _dp()
    per = n // dp
    return range(rank * per, (rank + 1) * per)


@torch.no_grad()
def compute_logprobs(model, batch: dict, micro: int, with_entropy: bool = False):
    """Per-token log-probs (and entropies) of `batch["input_ids"]` under `model`, [N, L-1]."""
    spec = (model.module if hasattr(model, "module") else model).mcore_rl_spec
    model.eval()

    def fn(logits, mb):
        logp, ent = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size, with_entropy)
        out = {"logp": logp}
        if with_entropy:
            out["entropy"] = ent
        return logits.sum() * 0, out

    out = run_microbatches(model, _micro_batches(batch, _my_rows(len(batch["input_ids"])), micro, ["input_ids"]),
                           fn, forward_only=True)
    model.train()
    logp = _gather_dp(torch.cat([o["logp"] for o in out]))
    ent = _gather_dp(torch.cat([o["entropy"] for o in out])) if with_entropy else None
    return logp, ent


@torch.no_grad()
def compute_values(critic, batch: dict, micro: int) -> torch.Tensor:
    critic.eval()
    out = run_microbatches(critic, _micro_batches(batch, _my_rows(len(batch["input_ids"])), micro, ["input_ids"]),
                           lambda v, mb: (v.sum() * 0, {"values": v[:, :-1, 0].float()}), forward_only=True)
    critic.train()
    return _gather_dp(torch.cat([o["values"] for o in out]))


def _denominator(batch: dict, rows: range, agg: str) -> float:
    if agg == "token-mean":
        return float(batch["mask"][rows.start:rows.stop].sum().clamp(min=1))
    return float(len(rows))


def _mean_metrics(out: list[dict]) -> dict[str, float]:
    keys = out[0].keys() if out else []
    local = {k: float(torch.stack([torch.as_tensor(o[k], dtype=torch.float64) for o in out]).mean()) for k in keys}
    dp, _, group = _dp()
    if dp > 1 and local:
        t = torch.tensor(list(local.values()), dtype=torch.float64, device=_device())
        dist.all_reduce(t, group=group)
        local = dict(zip(local, (t / dp).tolist()))
    return local


def _step(model, opt, loss_finite: bool = True) -> tuple[bool, float]:
    """Optimizer step unless the loss or the gradient norm is non-finite on any rank, then clear
    the DDP grad buffers; returns (update applied, grad norm).

    The check comes first because megatron only looks for inf/NaN when a loss scaler is in use
    (fp16): in fp32 and bf16 it would clip by a NaN norm and write NaN into every weight.
    """
    opt.prepare_grads()
    grad_norm = opt.get_grad_norm()  # reduced over the model-parallel group; DP grads are reduced
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    bad = torch.tensor([0.0 if loss_finite and math.isfinite(grad_norm) else 1.0], device=_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    ok = float(bad) == 0.0
    if ok:
        ok, norm, _ = opt.step()
        ok = bool(ok)
        grad_norm = float(norm) if norm is not None else grad_norm
    model.zero_grad_buffer()
    opt.zero_grad()
    return ok, grad_norm


def _finite(out: list[dict], key: str) -> bool:
    return all(math.isfinite(float(o[key])) for o in out)


def _dp_slice(rows: range) -> range:
    """This DP rank's contiguous share of a mini-batch."""
    dp, rank, _ = _dp()
    per = len(rows) // dp
    return range(rows.start + rank * per, rows.start + (rank + 1) * per)


def update_actor(actor, opt, batch: dict, cfg, mini_rows: list[range]) -> dict[str, float]:
    """PPO epochs over mini-batches; returns metrics averaged over all updates."""
    a = cfg.actor_rollout_ref.actor
    spec = actor.module.mcore_rl_spec
    agg = a.loss_agg_mode
    use_kl = a.use_kl_loss and "ref_logp" in batch
    want_ent = a.entropy_coeff != 0
    keys = ["input_ids", "old_logp", "advantages", "mask"] + (["ref_logp"] if use_kl else [])
    dp, _, group = _dp()
    history, bad = [], 0
    norm_len = batch["mask"].shape[1]
    for _ in range(a.ppo_epochs):
        for rows in mini_rows:
            denom = _denominator(batch, rows, agg)
            mine = _dp_slice(rows)

            def fn(logits, mb):
                logp, ent = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size, True)
                mask = mb["mask"]
                pg, m = policy_loss(logp, mb["old_logp"], mb["advantages"], mask, clip_low=a.clip_ratio_low,
                                    clip_high=a.clip_ratio_high, dual_clip_c=a.clip_ratio_c, agg=agg,
                                    denominator=denom, norm_len=norm_len)
                loss = pg
                ent_loss = agg_loss(ent, mask, agg, denominator=denom, norm_len=norm_len)
                if want_ent:
                    loss = loss - a.entropy_coeff * ent_loss
                metrics = {"actor/pg_loss": pg.detach(), "actor/entropy": ent_loss.detach(),
                           "actor/pg_clipfrac": m["clipfrac"], "actor/ppo_kl": m["approx_kl"]}
                if use_kl:
                    kl = agg_loss(kl_penalty(logp, mb["ref_logp"], a.kl_loss_type), mask, agg, denominator=denom,
                                  norm_len=norm_len)
                    loss = loss + a.kl_loss_coef * kl
                    metrics["actor/kl_loss"] = kl.detach()
                metrics["actor/loss"] = loss.detach()
                return loss, metrics

            out = run_microbatches(actor, _micro_batches(batch, mine, a.ppo_micro_batch_size_per_gpu, keys), fn)
            ok, grad_norm = _step(actor, opt, _finite(out, "actor/loss"))
            bad += not ok
            summed = {k: float(torch.stack([torch.as_tensor(o[k]) for o in out]).sum())
                      for k in ("actor/loss", "actor/pg_loss", "actor/entropy") + (("actor/kl_loss",) if use_kl else ())}
            m = _mean_metrics([{k: v for k, v in o.items() if k not in summed} for o in out])
            if dp > 1:
                t = torch.tensor(list(summed.values()), dtype=torch.float64, device=_device())
                dist.all_reduce(t, group=group)
                summed = dict(zip(summed, t.tolist()))
            history.append({**summed, **m, "actor/grad_norm": grad_norm})
    result = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    result["actor/skipped_updates"] = bad
    return result


def update_critic(critic, opt, batch: dict, cfg, mini_rows: list[range]) -> dict[str, float]:
    c = cfg.critic
    agg = c.loss_agg_mode
    dp, _, group = _dp()
    history, bad = [], 0
    norm_len = batch["mask"].shape[1]
    for _ in range(c.ppo_epochs):
        for rows in mini_rows:
            denom = _denominator(batch, rows, agg)
            mine = _dp_slice(rows)

            def fn(v, mb):
                vl, m = value_loss(v[:, :-1, 0].float(), mb["old_values"], mb["returns"], mb["mask"],
                                   clip=c.cliprange_value, agg=agg, denominator=denom, norm_len=norm_len)
                return vl, {"critic/loss": vl.detach(), "critic/vf_clipfrac": m["vf_clipfrac"]}

            out = run_microbatches(critic, _micro_batches(batch, mine, c.ppo_micro_batch_size_per_gpu,
                                                          ["input_ids", "old_values", "returns", "mask"]), fn)
            ok, grad_norm = _step(critic, opt, _finite(out, "critic/loss"))
            bad += not ok
            loss = torch.tensor(float(torch.stack([o["critic/loss"] for o in out]).sum()), dtype=torch.float64,
                                device=_device())
            if dp > 1:
                dist.all_reduce(loss, group=group)
            m = _mean_metrics([{"critic/vf_clipfrac": o["critic/vf_clipfrac"]} for o in out])
            history.append({"critic/loss": float(loss), **m, "critic/grad_norm": grad_norm})
    result = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    result["critic/skipped_updates"] = bad
    return result
