"""Micro-batched forward/backward through megatron's pipeline schedules, and TP-aware log-probs.

`run_microbatches` is the one way the trainer runs a model: it works for PP=1 and PP>1
(1F1B via `get_forward_backward_func`), forward-only or with backward, and returns the
per-micro-batch results on every rank (broadcast from the last PP stage).

Loss convention: `loss_fn` returns each micro-batch's *contribution to the global
objective* (e.g. sum of token losses / token count of the whole global batch). megatron
divides by the number of micro-batches and DDP averages over DP; we undo both so the
gradient is exactly that of the global objective, whatever the layout.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.distributed as dist


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                            with_entropy: bool = False, chunk_bytes: int | None = None):
    """Log-prob of `targets` (and the entropy) from logits split over TP on the vocab dim.

    `logits` [..., V_local] (this TP rank's vocab shard, any float dtype; a view such as
    ``logits[:, :-1]`` is read in place, not copied), `targets` [...] global token ids.
    Returns (logp, entropy or None), fp32, shaped like `targets`.

    Padded vocab columns (index >= vocab_size) are excluded: their logits are not -inf in the
    model, and counting them would shift every log-prob away from what the HF model and vLLM
    compute. The result is the exact formula of `vocab_parallel_logprobs_reference` (fp32
    math, up to summation order), computed chunk by chunk over the rows (`ChunkedVocabLogprobs`)
    so that no full-size fp32 copy of the logits exists in forward or backward; on CUDA the
    chunk math is fused with ``torch.compile`` (``MCORE_RL_LOGPROB_COMPILE=0`` turns it off;
    never used on CPU).
    """
    return ChunkedVocabLogprobs.apply(logits, targets, vocab_size, with_entropy, chunk_bytes or CHUNK_BYTES)


def vocab_parallel_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                                      with_entropy: bool = False):
    """The plain formula (full-size fp32 temporaries), kept as the oracle of the chunked version.

    Reductions over the vocab use megatron's TP all-reduce whose backward is the identity,
    which is the correct gradient for a value replicated on every TP rank.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as tp_sum

    logits = logits.float()
    v_local = logits.size(-1)
    start = ps.get_tensor_model_parallel_rank() * v_local
    cols = torch.arange(start, start + v_local, device=logits.device)
    pad = cols >= vocab_size
    logits = logits.masked_fill(pad, float("-inf"))
    m = logits.detach().max(dim=-1).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    shifted = logits - m.unsqueeze(-1)
    exp = shifted.exp()
    sumexp = tp_sum(exp.sum(-1))
    lse = sumexp.log()
    local_t = targets - start
    owned = (local_t >= 0) & (local_t < v_local)
    picked = shifted.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    logp = tp_sum(torch.where(owned, picked, torch.zeros_like(picked))) - lse
    if not with_entropy:
        return logp, None
    p_dot = tp_sum((exp * shifted.masked_fill(pad, 0.0)).sum(-1)) / sumexp
    return logp, lse - p_dot


# ------------------------------------------------------------------ chunked log-probs
# One chunk holds at most this many bytes of fp32 logits (rows x local vocab); the per-chunk
# temporaries are a few times that. 256 MiB = ~440 rows of a 152k vocab.
CHUNK_BYTES = 256 << 20


def _fwd_chunk(x, lt, owned):
    """Row max m, sum exp(x - m) and the target's logit from one [rows, valid] chunk (fp32 math)."""
    xf = x.float()
    m = xf.amax(-1)
    se = (xf - m[:, None]).exp().sum(-1)
    picked = torch.where(owned, xf.gather(-1, lt[:, None])[:, 0], 0.0)
    return m, se, picked


def _fwd_chunk_ent(x, lt, owned):
    """As `_fwd_chunk`, plus sum exp(x - m) * (x - m) (for the entropy)."""
    xf = x.float()
    m = xf.amax(-1)
    d = xf - m[:, None]
    e = d.exp()
    picked = torch.where(owned, xf.gather(-1, lt[:, None])[:, 0], 0.0)
    return m, e.sum(-1), picked, (e * d).sum(-1)


def _bwd_chunk(x, lse, g, lt, owned):
    """d/dx of sum(g * logp) for one chunk: g * (onehot(target) - softmax), in x's dtype."""
    p = (x.float() - lse[:, None]).exp()
    gx = p * (-g[:, None])
    gx = gx.scatter_add(-1, lt[:, None], torch.where(owned, g, 0.0)[:, None])
    return gx.to(x.dtype)


def _bwd_chunk_ent(x, lse, mu, g, gh, lt, owned):
    """d/dx of sum(g * logp + gh * H): g * onehot - p * (g + gh * (x - mu)), mu = E_p[x]."""
    xf = x.float()
    p = (xf - lse[:, None]).exp()
    gx = -p * (g[:, None] + gh[:, None] * (xf - mu[:, None]))
    gx = gx.scatter_add(-1, lt[:, None], torch.where(owned, g, 0.0)[:, None])
    return gx.to(x.dtype)


_EAGER = {"fwd": _fwd_chunk, "fwd_ent": _fwd_chunk_ent, "bwd": _bwd_chunk, "bwd_ent": _bwd_chunk_ent}
_COMPILED: dict = {}
_compile_error: str | None = None


def _compile_wanted(device: torch.device) -> bool:
    flag = os.environ.get("MCORE_RL_LOGPROB_COMPILE", "auto").strip().lower()
    if flag in ("0", "false", "off", "no"):
        return False
    return device.type == "cuda" and _compile_error is None


def _kernel(name: str, device: torch.device):
    if not _compile_wanted(device):
        return _EAGER[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_EAGER[name], dynamic=None)
    return _COMPILED[name]


def _call(name: str, device: torch.device, *args):
    """Run one chunk kernel, compiled where wanted; a compile failure falls back to eager, once, loudly."""
    global _compile_error
    fn = _kernel(name, device)
    if fn is _EAGER[name]:
        return fn(*args)
    try:
        return fn(*args)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # e.g. no working triton / C compiler on this machine
        _compile_error = f"{type(e).__name__}: {str(e)[:200]}"
        warnings.warn(f"torch.compile of the log-prob chunks failed, using eager torch: {_compile_error}")
        return _EAGER[name](*args)


def _row_blocks(x: torch.Tensor, rows: int):
    """(flat row offset, 2-D view [r, V]) blocks covering x's leading dims in order, without
    copying x when it is contiguous or a slice along dim 1 of a contiguous [B, S, V] tensor."""
    V = x.size(-1)
    if x.is_contiguous():
        x2 = x.view(-1, V)
        for i in range(0, x2.size(0), rows):
            yield i, x2[i:i + rows]
    elif x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == V:
        S = x.size(1)
        for b in range(x.size(0)):
            for i in range(0, S, rows):
                yield b * S + i, x[b, i:i + rows]
    else:
        yield from _row_blocks(x.contiguous(), rows)


class ChunkedVocabLogprobs(torch.autograd.Function):
    """log p(target) and the entropy from vocab-parallel logits, chunk by chunk over the rows.

    Forward: for each chunk of rows, the local shard's max m, sum exp(x - m), the target's
    logit and (for the entropy) sum exp(x - m)(x - m), in fp32 from the logits' own dtype;
    across TP one MAX and one SUM all-reduce combine them (rescaling by exp(m - M)):
    lse = M + log SE, logp = x[t] - lse, H = lse - E_p[x]. Backward recomputes p chunk by
    chunk and writes the gradient in the logits' dtype: g * onehot - p (g + gh (x - E_p[x]));
    no communication (each rank owns its vocab columns; the loss is replicated over TP, the
    same gradient megatron's identity-backward all-reduce gives the reference). Padded vocab
    columns get no probability and a zero gradient. Saved for backward: the logits (as
    given, no copy) and three fp32 values per row. Against the plain log-softmax formula it is
    faster and holds no vocab-sized fp32 temporaries (timings and memory: benchmarks/gpu/RESULTS.md).
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_size: int, with_entropy: bool, chunk_bytes: int):
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        v_local = logits.size(-1)
        start = ps.get_tensor_model_parallel_rank() * v_local
        valid = max(0, min(v_local, vocab_size - start))  # local columns that are real vocabulary
        t = targets.reshape(-1)
        n, dev = t.numel(), logits.device
        f32 = dict(dtype=torch.float32, device=dev)
        m = torch.full((n,), float("-inf"), **f32)
        se, picked = torch.zeros(n, **f32), torch.zeros(n, **f32)
        s1 = torch.zeros(n, **f32) if with_entropy else None
        lt = t - start
        owned = (lt >= 0) & (lt < valid)
        lt = lt.clamp(0, max(valid - 1, 0))
        rows = max(1, chunk_bytes // (4 * max(valid, 1)))
        if valid > 0:
            for i, xb in _row_blocks(logits, rows):
                r = slice(i, i + xb.size(0))
                out = _call("fwd_ent" if with_entropy else "fwd", dev, xb[:, :valid], lt[r], owned[r])
                m[r], se[r], picked[r] = out[0], out[1], out[2]
                if with_entropy:
                    s1[r] = out[3]
        if tp > 1:
            group = ps.get_tensor_model_parallel_group()
            gm = m.clone()
            dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
            has = se > 0  # this rank has valid columns (their exp-sum is >= 1)
            scale = torch.where(has, (m - gm).exp(), 0.0)
            parts = [se * scale, picked]
            if with_entropy:  # sum e (x - M) = scale * (s1 + (m - M) * se)
                parts.append(torch.where(has, (s1 + (m - gm) * se) * scale, 0.0))
            stacked = torch.stack(parts)
            dist.all_reduce(stacked, group=group)
            se, picked = stacked[0], stacked[1]
            if with_entropy:
                s1 = stacked[2]
            m = gm
        lse = m + se.log()
        logp = picked - lse
        mu = m + s1 / se if with_entropy else lse  # E_p[x]
        ctx.save_for_backward(logits, t, lse, mu)
        ctx.meta = (start, valid, rows, with_entropy)
        ctx.set_materialize_grads(False)
        ent = (lse - mu).view(targets.shape) if with_entropy else None
        return logp.view(targets.shape), ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, t, lse, mu = ctx.saved_tensors
        start, valid, rows, with_entropy = ctx.meta
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        dev = logits.device
        g = g_logp.reshape(-1).float() if g_logp is not None else torch.zeros_like(lse)
        use_ent = with_entropy and g_ent is not None
        gh = g_ent.reshape(-1).float() if use_ent else None
        gx = torch.empty(logits.shape, dtype=logits.dtype, device=dev)
        if valid < gx.size(-1):
            gx[..., valid:] = 0
        lt = t - start
        owned = (lt >= 0) & (lt < valid)
        lt = lt.clamp(0, max(valid - 1, 0))
        gx2 = gx.view(-1, gx.size(-1))
        if valid > 0:
            for i, xb in _row_blocks(logits, rows):
                r = slice(i, i + xb.size(0))
                if use_ent:
                    gb = _call("bwd_ent", dev, xb[:, :valid], lse[r], mu[r], g[r], gh[r], lt[r], owned[r])
                else:
                    gb = _call("bwd", dev, xb[:, :valid], lse[r], g[r], lt[r], owned[r])
                gx2[r, :valid] = gb
        return gx, None, None, None, None


def _broadcast_from_last_stage(obj):
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, ps.get_pipeline_model_parallel_world_size() - 1)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def run_microbatches(model, micro_batches: list[dict], loss_fn: Callable, forward_only: bool = False) -> list[dict]:
    """Run `micro_batches` through `model` (a GPTModel or its DDP wrapper). `loss_fn(output, mb)
    -> (loss, metrics_dict)`; returns the metrics dicts (tensors moved to CPU) on every rank.

    A micro-batch is padded (`input_ids` [b, s], all of one shape) or packed (`input_ids`
    [1, t] with `position_ids` and THD `packed_seq_params`, trainer/packing.py; t may differ
    between micro-batches: pipeline stages then exchange each activation's shape first)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mcore_rl.models.build import position_ids

    inner = model.module if hasattr(model, "module") else model
    spec = inner.mcore_rl_spec
    n = len(micro_batches)
    scale = n * (1 if forward_only else ps.get_data_parallel_world_size())
    shapes = {tuple(mb["input_ids"].shape) for mb in micro_batches}
    packed = "packed_seq_params" in micro_batches[0]
    if len(shapes) > 1 and not packed:
        raise ValueError("padded micro-batches must all have the same [batch, seq] shape (pad them, or pack them)")
    b, s = max(shapes, key=lambda x: x[1])
    it = iter(micro_batches)

    def forward_step(data_iterator, m):
        mb = next(data_iterator)
        ids = mb["input_ids"]
        pos = mb["position_ids"] if "position_ids" in mb else position_ids(spec, ids.size(0), ids.size(1), ids.device)
        out = m(ids, pos, None, packed_seq_params=mb.get("packed_seq_params"))

        def loss_func(output):
            loss, metrics = loss_fn(output, mb)
            return loss * scale, {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in metrics.items()}

        return out, loss_func

    config = inner.config
    variable = config.variable_seq_lengths
    config.variable_seq_lengths = len(shapes) > 1  # p2p shapes per message (PP) when micro-batches differ
    try:
        results = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=it, model=[model], num_microbatches=n,
            seq_length=s, micro_batch_size=b, forward_only=forward_only)
    finally:
        config.variable_seq_lengths = variable
    return _broadcast_from_last_stage(results if ps.is_pipeline_last_stage() else None)
