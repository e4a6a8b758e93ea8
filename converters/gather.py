"""Megatron layout (TP x PP shards, any DP) -> full HF-named tensors, on every rank.

SPMD: every rank walks the same global list of parameters (all PP stages, in order). For a
parameter of stage p, the ranks of stage p all-gather its TP shards, the result is
broadcast over the PP group, and every rank turns the shards into HF tensors with the
converter's table (`converters.mapping.mcore_to_hf`, the only copy of the mapping).

Tensors are produced one Megatron parameter at a time and handed to the consumer before
the next is gathered, so extra memory is bounded by the largest parameter (its TP shards
plus its HF form), never by the model. The list of global parameters (names, shapes, owners) is computed once.

A model with LoRA adapters (`mcore_rl.models.lora`) yields its merged weights from
`iter_hf_tensors` (each TP rank merges its own shard before the gather) and its adapters, in
peft's names, from `iter_lora_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from converters.hf_io import global_layer_offset, local_to_global
from converters.mapping import NameIndex, hf_counterpart, is_lora, mcore_to_hf


@dataclass
class GlobalParam:
    stage: int
    global_name: str
    local_name: str  # only meaningful on ranks of `stage`
    shape: tuple
    dtype: torch.dtype


def _own_hf_tensors(name: str, model) -> bool:
    """Whether `name` is the one home of its HF tensors (not the value head, not a tied copy)."""
    return hf_counterpart(name, model.mcore_rl_spec, getattr(model, "mcore_rl_role", "actor")) == name


def global_params(model, lora: bool = False) -> list[GlobalParam]:
    """The global, ordered parameter list, identical on every rank: the base weights, or with
    `lora` the LoRA adapters."""
    from megatron.core import parallel_state as ps

    stage = ps.get_pipeline_model_parallel_rank()
    offset = global_layer_offset(model)
    mine = [(local_to_global(n, offset), n, tuple(p.shape), p.dtype)
            for n, p in model.named_parameters() if is_lora(n) == lora and (lora or _own_hf_tensors(n, model))]
    if ps.get_pipeline_model_parallel_world_size() == 1:
        stages = [mine]
    else:
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return [GlobalParam(s, g, loc, shape, dtype) for s, items in enumerate(stages) for g, loc, shape, dtype in items]


def iter_hf_tensors(model, source: str = "param", params: list[GlobalParam] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, full tensor) for every HF tensor of `model` (unwrapped GPTModel or DDP).

    `source="grad"` yields the accumulated gradients (`main_grad`) in HF layout instead. With
    LoRA adapters (enabled), a weight they adapt is yielded merged: ``W + scaling * B @ A``.
    At TP=1, on the pipeline stage that holds it, a tensor without a LoRA merge is a view of the
    parameter (or of its gradient): copy it to keep it past the next optimizer step.
    """
    from mcore_rl.models.lora import adapters

    inner = model.module if hasattr(model, "module") else model
    merge = {n: m for n, m in adapters(inner).items() if m.enabled} if source == "param" else {}
    yield from _gather(inner, source, params if params is not None else global_params(inner), merge)


def iter_lora_tensors(model, source: str = "param", params: list[GlobalParam] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (peft name, full tensor) for every LoRA adapter of `model` (``model.layers.0.self_attn.
    q_proj.lora_A.weight``: peft's names without its ``base_model.model.`` prefix); `source="grad"`:
    their accumulated gradients. Collective, like `iter_hf_tensors`."""
    inner = model.module if hasattr(model, "module") else model
    yield from _gather(inner, source, params if params is not None else global_params(inner, lora=True), {})


def _gather(inner, source: str, params: list[GlobalParam], merge: dict) -> Iterator[tuple[str, torch.Tensor]]:
    from megatron.core import parallel_state as ps

    from mcore_rl.models.lora import lora_of

    spec, lora = inner.mcore_rl_spec, lora_of(inner)
    index = NameIndex(spec, lora=lora.targets if lora else ())
    local = dict(inner.named_parameters())
    my_stage = ps.get_pipeline_model_parallel_rank()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    device = next(inner.parameters()).device
    for e in params:
        if e.stage == my_stage:
            p = local[e.local_name]
            t = (p.main_grad if source == "grad" and hasattr(p, "main_grad") else p.grad if source == "grad" else p).detach()
            if e.local_name in merge:
                t = merge[e.local_name].merged(t)
            if tp > 1:
                flat = torch.empty((tp * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=device)
                dist.all_gather_into_tensor(flat, t.contiguous(), group=tp_group)
                stacked = flat.view(tp, *t.shape)
            else:
                stacked = t.unsqueeze(0)
        else:
            dtype = torch.float32 if source == "grad" else e.dtype
            stacked = torch.empty((tp, *e.shape), dtype=dtype, device=device)
        if pp > 1:
            dist.broadcast(stacked, src=dist.get_global_rank(pp_group, e.stage), group=pp_group)
        rule, layer = index.mcore(e.global_name)
        for name, tensor in zip(rule.hf_names(layer), mcore_to_hf(rule, list(stacked.unbind(0)), spec)):
            yield name, tensor
