"""Fast weight sync: Megatron shard -> vLLM's fused parameters through a precomputed copy prog.

The general path (`Resharder.load_hf`) turns every Megatron parameter into full HF-named
tensors and hands them to vLLM's per-tensor ``load_weights``, which slices its TP shard and
re-fuses QKV and gate/up; that costs many times the copy floor (benchmarks/sync.py). When the
engine accepts plain copies (`WeightTarget.copy_slots`: an unquantised vLLM model on GPU whose
parameters are the tensors its kernels read) and this rank's training shard and its rollout
shard line up (same TP size and rank, PP=1, colocated in one process, no LoRA), each engine parameter
is a fixed function of this rank's Megatron parameters:

=================  ===========================================  ==========================
vLLM parameter     Megatron source (this rank's shard)          operation
=================  ===========================================  ==========================
norms, q/k norms   the same tensor                              copy
o_proj, down_proj  ``linear_proj`` / ``linear_fc2`` (row split)  copy
gate_up_proj       ``linear_fc1`` = [gate_r; up_r]              copy
qkv_proj (+bias)   ``linear_qkv`` interleaved per query group   one row gather (index_select)
embed / lm_head    vocab shard, Megatron padding to 128         copy valid rows, zero the rest
=================  ===========================================  ==========================

The program (destination views, sources, the QKV row permutation `converters.mapping.qkv_rows`)
is built once; a sync is just those copies: no names, no Python per HF tensor, no
temporaries. On CUDA the copies are captured once in a CUDA graph and a sync is one graph
replay (``mode="graph"``); the capture is redone if a parameter's storage moved. vLLM's sleep
mode (cumem) keeps virtual addresses across sleep/wake, so the graph stays valid.

Whether the program applies is decided once, from the engine's description of its parameters
(`CopySlots`: fused parts, TP shard, heads, vocabulary rows); anything unexpected raises
`NotApplicable` (use the HF-named path). Every engine parameter must be written exactly as
vLLM's own loader would write it: the HF-named path is the oracle (bit for bit, in the GPU
tests and ``benchmarks/sync.py --check-fast-path``).

Replicated tensors (norms) are copied from this rank's own copy, where the HF path takes TP
rank 0's: the two agree because Megatron keeps replicated parameters identical across TP.

Not applicable on CPU vLLM: after loading, its linear weights are repacked into oneDNN's
layout, so the parameters are not what the kernels read.

`Resharder.load` (and so the trainer) takes this path automatically where it applies and
falls back to the HF-named path, with the reason, where it does not
(``rollout.sync_fast_path: auto|off``). Measured speed: benchmarks/gpu/RESULTS.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from converters.mapping import NameIndex, hf_counterpart, qkv_rows
from mcore_rl.models.lora import lora_of
from mcore_rl.rollout.base import CopySlots


class NotApplicable(RuntimeError):
    """The fast path cannot reproduce vLLM's loader for this model/layout; use `Resharder`."""


@dataclass
class CopyProgram:
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dst, src)
    gathers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dst, src, rows)
    zeros: list[torch.Tensor] = field(default_factory=list)  # vocab padding rows, zeroed like vLLM's loader
    watched: list[torch.nn.Parameter] = field(default_factory=list)  # whose storage the views point into
    nbytes: int = 0  # bytes written to vLLM parameters per sync (== bytes of the HF tensors)
    n_hf_tensors: int = 0


def build_program(mcore_model, slots: CopySlots) -> CopyProgram:
    """The copy program from this rank's Megatron shard into the engine's parameters (see module doc)."""
    from megatron.core import parallel_state as ps

    inner = mcore_model.module if hasattr(mcore_model, "module") else mcore_model
    spec = inner.mcore_rl_spec
    if getattr(inner, "mcore_rl_role", "actor") == "critic":
        raise NotApplicable("the critic has no rollout counterpart")
    if lora_of(inner) is not None:
        raise NotApplicable("LoRA: merged weights take the HF-named path")
    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise NotApplicable("pipeline parallelism: this rank does not hold every layer")
    if spec.family not in ("llama", "qwen2", "qwen3", "mistral"):
        raise NotApplicable(f"no fast-path layout for family {spec.family!r}")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    index = NameIndex(spec)
    prog = CopyProgram()
    written: dict[str, int] = {}  # engine param -> rows written (to check full coverage)
    per = spec.num_attention_heads // spec.num_query_groups
    d = spec.head_dim

    def target(hf_name: str):
        vname, part = slots.locate(hf_name)
        if vname not in slots.slots:
            raise NotApplicable(f"the engine has no parameter {vname!r} (for HF tensor {hf_name!r})")
        slot = slots.slots[vname]
        p = slot.param
        if p.numel() == 0:
            raise NotApplicable(f"engine parameter {vname} is empty (repacked?)")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise NotApplicable(f"engine parameter {vname} has dtype {p.dtype} (quantised?)")
        return vname, part, p, slot

    def check_rank(vname, slot):
        r, s = slot.tp_rank, slot.tp_size
        if (r is not None and r != tp_rank) or (s is not None and s != tp):
            raise NotApplicable(f"{vname}: engine TP rank/size ({r}/{s}) != Megatron ({tp_rank}/{tp})")

    for mname, param in inner.named_parameters():
        if hf_counterpart(mname, spec) != mname:
            continue  # a tied copy of the embedding
        rule, layer = index.mcore(mname)
        hf_names = rule.hf_names(layer)
        src = param.detach()
        prog.watched.append(param)
        if rule.kind in ("repl", "row", "col", "gate_up"):
            vname, part, dst, slot = target(hf_names[0])
            if rule.kind == "gate_up":
                if part != 0 or slots.locate(hf_names[1]) != (vname, 1):
                    raise NotApplicable(f"{vname}: gate/up are not fused as [gate; up]")
                sizes = slot.part_sizes
                if sizes is None or len(sizes) != 2 or sizes[0] != spec.ffn_hidden_size or sizes[1] != spec.ffn_hidden_size:
                    raise NotApplicable(f"{vname}: unexpected output_sizes {sizes}")
            if rule.kind != "repl":
                check_rank(vname, slot)
            if dst.shape != src.shape:
                raise NotApplicable(f"{vname}: engine shard {tuple(dst.shape)} != Megatron shard {tuple(src.shape)}")
            prog.copies.append((dst.data, src))
            written[vname] = dst.shape[0]
        elif rule.kind == "qkv":
            vname, _, dst, slot = target(hf_names[0])
            if [slots.locate(n) for n in hf_names] != [(vname, 0), (vname, 1), (vname, 2)]:
                raise NotApplicable(f"{vname}: q/k/v are not fused as [q; k; v]")
            check_rank(vname, slot)
            g_local = spec.num_query_groups // tp
            if slot.heads != (g_local * per, g_local, d, 1):
                raise NotApplicable(f"{vname}: engine heads (q, kv, size, kv replicas) {slot.heads} != Megatron "
                                    f"{(g_local * per, g_local, d, 1)}")
            if dst.shape != src.shape:
                raise NotApplicable(f"{vname}: engine shard {tuple(dst.shape)} != Megatron shard {tuple(src.shape)}")
            rows = qkv_rows(g_local, per, d, src.device)
            prog.gathers.append((dst.data, src, rows))
            written[vname] = dst.shape[0]
        elif rule.kind == "vocab":
            vname, _, dst, slot = target(hf_names[0])
            check_rank(vname, slot)
            if slot.vocab_rows is None:
                raise NotApplicable(f"{vname}: not a vocab-parallel embedding")
            start, n = slot.vocab_rows[0], slot.vocab_rows[1] - slot.vocab_rows[0]
            rows_m = spec.padded_vocab_size // tp
            if start != tp_rank * rows_m or n > rows_m or dst.shape[1:] != src.shape[1:]:
                raise NotApplicable(f"{vname}: engine vocab shard [{start}, {start + n}) does not line up with "
                                    f"Megatron's [{tp_rank * rows_m}, {(tp_rank + 1) * rows_m})")
            prog.copies.append((dst.data[:n], src[:n]))
            if dst.shape[0] > n:
                prog.zeros.append(dst.data[n:])
            written[vname] = dst.shape[0]
        else:
            raise NotApplicable(f"no fast-path operation for rule kind {rule.kind!r}")
        prog.n_hf_tensors += len(hf_names)
    missing = sorted(set(slots.slots) - set(written))
    if missing:
        raise NotApplicable(f"engine parameters the program does not write: {missing[:5]}")
    prog.watched += [slot.param for slot in slots.slots.values()]
    prog.nbytes = sum(d_.numel() * d_.element_size() for d_, _ in prog.copies) + \
        sum(d_.numel() * d_.element_size() for d_, _, _ in prog.gathers)
    return prog


SMALL_BYTES = 1 << 20  # below this a copy is launch-bound: batch those into one multi-tensor copy


@torch.no_grad()
def run_program(prog: CopyProgram, mode: str = "hybrid") -> None:
    """Issue the program's copies eagerly.

    ``"hybrid"``: one ``copy_`` per large tensor (full-bandwidth copy kernels) and one
    multi-tensor ``_foreach_copy_`` for all tensors under `SMALL_BYTES` (norms, biases);
    ``"foreach"``: one multi-tensor copy for everything; ``"loop"``: one ``copy_`` each.
    """
    if mode == "loop":
        for dst, src in prog.copies:
            dst.copy_(src)
    elif mode == "hybrid":
        small = [(d, s) for d, s in prog.copies if d.numel() * d.element_size() < SMALL_BYTES]
        for dst, src in prog.copies:
            if dst.numel() * dst.element_size() >= SMALL_BYTES:
                dst.copy_(src)
        if small:
            torch._foreach_copy_([c[0] for c in small], [c[1] for c in small])
    elif prog.copies:
        torch._foreach_copy_([c[0] for c in prog.copies], [c[1] for c in prog.copies])
    for dst, src, rows in prog.gathers:
        if dst.dtype == src.dtype:
            torch.index_select(src, 0, rows, out=dst)
        else:
            dst.copy_(src.index_select(0, rows))
    for z in prog.zeros:
        z.zero_()


class FastSync:
    """Weight sync into an engine's `CopySlots` by a precomputed copy program (see module doc).

    ``mode``: ``"graph"`` (the ``"hybrid"`` copies captured once in a CUDA graph; default on
    CUDA), or eager: ``"hybrid"`` (large tensors one ``copy_`` each, small ones in one
    multi-tensor copy), ``"foreach"`` (one multi-tensor copy for all), ``"loop"`` (one
    ``copy_`` each); QKV is one row gather per tensor in every mode. All write the same bytes.
    Build it and call `sync` inside `RolloutEngine.update_weights` (weights awake).
    """

    def __init__(self, mcore_model, slots: CopySlots, mode: str | None = None):
        self.model = mcore_model
        self.mode = mode or ("graph" if torch.cuda.is_available() else "hybrid")
        if self.mode not in ("graph", "hybrid", "foreach", "loop"):
            raise ValueError(f"mode must be graph, hybrid, foreach or loop, got {self.mode!r}")
        t0 = time.perf_counter()
        self.program = build_program(mcore_model, slots)
        self.build_seconds = time.perf_counter() - t0
        self._graph = None
        self._ptrs = None
        self.graph_error: str | None = None
        self.captures = 0  # CUDA graph captures so far (1 unless a parameter's storage moved)

    def _ptr_key(self):
        return tuple(p.data_ptr() for p in self.program.watched)

    def _eager(self, mode: str):
        run_program(self.program, mode)

    def _capture(self):
        self._graph = None
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._eager("hybrid")  # warm-up outside the graph (allocator, kernels)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._eager("hybrid")
        self._graph, self._ptrs = g, self._ptr_key()
        self.captures += 1

    @torch.no_grad()
    def copy(self) -> None:
        """Issue the copies (asynchronous on CUDA)."""
        if self.mode == "graph":
            if self._graph is None or self._ptr_key() != self._ptrs:
                try:
                    self._capture()
                except RuntimeError as e:  # capture refused: same copies, issued eagerly
                    self.graph_error, self.mode, self._graph = repr(e)[:300], "hybrid", None
                    torch.cuda.synchronize()
                    self._eager(self.mode)
                    return
            self._graph.replay()
        else:
            self._eager(self.mode)

    @torch.no_grad()
    def sync(self) -> dict[str, float]:
        """Write the actor's weights into the engine's parameters; the HF-named path's stats."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.copy()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"sync/seconds": dt, "sync/bytes": self.program.nbytes, "sync/tensors": self.program.n_hf_tensors,
                "sync/GBps": self.program.nbytes / dt / 1e9 if dt > 0 else 0.0, "sync/graph_captures": self.captures}
