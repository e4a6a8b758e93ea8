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

from typing import Callable

import torch
import torch.distributed as dist


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                            with_entropy: bool = False):
    """Log-prob of `targets` (and the entropy) from logits split over TP on the vocab dim.

    Padded vocab columns (index >= vocab_size) are excluded: their logits are not -inf in the
    model, and counting them would shift every log-prob away from what the HF model and vLLM
    compute. Reductions over the vocab use megatron's TP all-reduce whose backward is the
    identity, which is the correct gradient for a value replicated on every TP rank.
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


def _broadcast_from_last_stage(obj):
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, ps.get_pipeline_model_parallel_world_size() - 1)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def run_microbatches(model, micro_batches: list[dict], loss_fn: Callable, forward_only: bool = False,
                     extra_inputs: Callable | None = None) -> list[dict]:
    """Run `micro_batches` (dicts with `input_ids` [b, s] and whatever `loss_fn` needs) through
    `model` (a GPTModel or its DDP wrapper). `loss_fn(output, mb) -> (loss, metrics_dict)`;
    returns the metrics dicts (tensors moved to CPU) on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mcore_rl.models.build import position_ids

    inner = model.module if hasattr(model, "module") else model
    spec = inner.mcore_rl_spec
    n = len(micro_batches)
    scale = n * (1 if forward_only else ps.get_data_parallel_world_size())
    b, s = micro_batches[0]["input_ids"].shape
    if any(mb["input_ids"].shape != (b, s) for mb in micro_batches):
        raise ValueError("all micro-batches must have the same [batch, seq] shape (pad them)")
    it = iter(micro_batches)

    def forward_step(data_iterator, m):
        mb = next(data_iterator)
        ids = mb["input_ids"]
        out = m(ids, position_ids(spec, ids.size(0), ids.size(1), ids.device), None)

        def loss_func(output):
            loss, metrics = loss_fn(output, mb)
            return loss * scale, {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in metrics.items()}

        return out, loss_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=it, model=[model], num_microbatches=n,
        seq_length=s, micro_batch_size=b, forward_only=forward_only)
    return _broadcast_from_last_stage(results if ps.is_pipeline_last_stage() else None)
