"""Fast weight sync: Megatron shard -> vLLM's fused parameters through a precomputed copy plan.

The general path (`Resharder`) turns every Megatron parameter into full HF-named tensors and
hands them to vLLM's per-tensor ``load_weights``, which slices its TP shard and re-fuses QKV
and gate/up; that costs ~10x the copy floor (benchmarks/sync.py). When this rank's training shard
and its rollout shard line up (same TP size and rank, PP=1, colocated in one process, an
unquantised vLLM model on GPU whose parameters are the tensors its kernels read), each vLLM
parameter is a fixed function of this rank's Megatron parameters:

=================  ===========================================  ==========================
vLLM parameter     Megatron source (this rank's shard)          operation
=================  ===========================================  ==========================
norms, q/k norms   the same tensor                              copy
o_proj, down_proj  ``linear_proj`` / ``linear_fc2`` (row split)  copy
gate_up_proj       ``linear_fc1`` = [gate_r; up_r]              copy
qkv_proj (+bias)   ``linear_qkv`` interleaved per query group   one row gather (index_select)
embed / lm_head    vocab shard, Megatron padding to 128         copy valid rows, zero the rest
=================  ===========================================  ==========================

The plan (destination views, sources, the QKV row permutation) is built once; a sync is
just those copies: no names, no Python per HF tensor, no temporaries. On CUDA the copies
are captured once in a CUDA graph and a sync is one graph replay (``mode="graph"``); the
capture is redone if a parameter's storage moved. vLLM's sleep mode (cumem) keeps virtual
addresses across sleep/wake, so the graph stays valid.

Whether the plan applies is decided once, from the vLLM modules' own attributes
(``QKVParallelLinear.num_heads/num_kv_heads/head_size/tp_rank``, ``MergedColumnParallelLinear
.output_sizes``, ``VocabParallelEmbedding.shard_indices``) and the model class's
``packed_modules_mapping``; anything unexpected raises `NotApplicable` (use `Resharder`).
Every vLLM parameter must be written exactly as vLLM's own loader would write it: the
HF-named path is the oracle (`check_against_hf_path`, bit for bit).

Replicated tensors (norms) are copied from this rank's own copy, where the HF path takes TP
rank 0's: the two agree because Megatron keeps replicated parameters identical across TP.

Not applicable on CPU vLLM: its linear weights are repacked for oneDNN after loading
(FIELD_NOTES), so the parameters are not what the kernels read.

Measured (H100, vLLM 0.26, TP=1, random Qwen2.5 shapes; benchmarks/gpu/RESULTS.md): 1.5B
2.9 ms = 1.40x the copy floor (HF-named path 34.5 ms = 16.8x), 7B 11.7 ms = 1.15x (47 ms),
bit-identical vLLM parameters. Verified bit for bit against vLLM's own loaders at TP=1 and
TP=2 (CPU, real vLLM model objects: ``benchmarks/sync.py --check-fast-path``). `Resharder.sync`
(and so the trainer) takes this path automatically where it applies and falls back to the
HF-named path, with the reason, where it does not (``rollout.sync_fast_path: auto|off``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from converters.mapping import NameIndex


class NotApplicable(RuntimeError):
    """The fast path cannot reproduce vLLM's loader for this model/layout; use `Resharder`."""


@dataclass
class Plan:
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dst, src)
    gathers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (dst, src, rows)
    zeros: list[torch.Tensor] = field(default_factory=list)  # vocab padding rows, zeroed like vLLM's loader
    watched: list[torch.nn.Parameter] = field(default_factory=list)  # whose storage the views point into
    nbytes: int = 0  # bytes written to vLLM parameters per sync (== bytes of the HF tensors)
    n_hf_tensors: int = 0


def _inverse_packed(vllm_model) -> dict[str, tuple[str, int]]:
    packed = getattr(type(vllm_model), "packed_modules_mapping", None) or {}
    return {sub: (fused, i) for fused, subs in packed.items() for i, sub in enumerate(subs)}


def _vllm_name(hf_name: str, inverse: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    parts = hf_name.split(".")
    for i, p in enumerate(parts):
        if p in inverse:
            fused, shard = inverse[p]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return hf_name, None


def _qkv_rows(groups_local: int, per: int, d: int, device) -> torch.Tensor:
    """Row permutation: vLLM's [q (all local heads); k; v] from Megatron's per-group [q_g; k_g; v_g]."""
    g = torch.arange(groups_local).view(-1, 1, 1) * (per + 2) * d
    q = (g + torch.arange(per * d).view(1, 1, -1)).reshape(-1)
    k = (g + per * d + torch.arange(d).view(1, 1, -1)).reshape(-1)
    v = (g + (per + 1) * d + torch.arange(d).view(1, 1, -1)).reshape(-1)
    return torch.cat([q, k, v]).to(device)


def build_plan(mcore_model, vllm_model) -> Plan:
    """The copy plan from this rank's Megatron shard into this rank's vLLM model (see module doc)."""
    from megatron.core import parallel_state as ps

    inner = mcore_model.module if hasattr(mcore_model, "module") else mcore_model
    spec = inner.mcore_rl_spec
    if getattr(inner, "mcore_rl_role", "actor") == "critic":
        raise NotApplicable("the critic has no rollout counterpart")
    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise NotApplicable("pipeline parallelism: this rank does not hold every layer")
    if spec.family not in ("llama", "qwen2", "qwen3", "mistral"):
        raise NotApplicable(f"no fast-path layout for family {spec.family!r}")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    index = NameIndex(spec)
    inverse = _inverse_packed(vllm_model)
    vparams = dict(vllm_model.named_parameters())
    vmodules = dict(vllm_model.named_modules())
    plan = Plan()
    written: dict[str, int] = {}  # vLLM param -> rows written (to check full coverage)
    per = spec.num_attention_heads // spec.num_query_groups
    d = spec.head_dim

    def target(hf_name: str):
        vname, shard = _vllm_name(hf_name, inverse)
        if vname not in vparams:
            raise NotApplicable(f"vLLM model has no parameter {vname!r} (for HF tensor {hf_name!r})")
        p = vparams[vname]
        if p.numel() == 0:
            raise NotApplicable(f"vLLM parameter {vname} is empty (CPU: repacked for oneDNN)")
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise NotApplicable(f"vLLM parameter {vname} has dtype {p.dtype} (quantised?)")
        return vname, shard, p, vmodules.get(vname.rsplit(".", 1)[0])

    def check_rank(vname, module):
        r = getattr(module, "tp_rank", None)
        s = getattr(module, "tp_size", None)
        if (r is not None and r != tp_rank) or (s is not None and s != tp):
            raise NotApplicable(f"{vname}: vLLM TP rank/size ({r}/{s}) != Megatron ({tp_rank}/{tp})")

    for mname, param in inner.named_parameters():
        if mname == "output_layer.weight" and spec.tied_embeddings:
            continue
        rule, layer = index.mcore(mname)
        hf_names = rule.hf_names(layer)
        src = param.detach()
        plan.watched.append(param)
        if rule.kind in ("repl", "row", "col", "gate_up"):
            vname, shard, dst, module = target(hf_names[0])
            if rule.kind == "gate_up":
                if shard != 0 or _vllm_name(hf_names[1], inverse)[0] != vname:
                    raise NotApplicable(f"{vname}: gate/up are not fused as [gate; up]")
                sizes = getattr(module, "output_sizes", None)
                if sizes is None or len(sizes) != 2 or sizes[0] != spec.ffn_hidden_size or sizes[1] != spec.ffn_hidden_size:
                    raise NotApplicable(f"{vname}: unexpected output_sizes {sizes}")
            if rule.kind != "repl":
                check_rank(vname, module)
            if dst.shape != src.shape:
                raise NotApplicable(f"{vname}: vLLM shard {tuple(dst.shape)} != Megatron shard {tuple(src.shape)}")
            plan.copies.append((dst.data, src))
            written[vname] = dst.shape[0]
        elif rule.kind == "qkv":
            names = [_vllm_name(n, inverse) for n in hf_names]
            vname, _, dst, module = target(hf_names[0])
            if [s for _, s in names] != [0, 1, 2] or any(n != vname for n, _ in names):
                raise NotApplicable(f"{vname}: q/k/v are not fused as [q; k; v]")
            check_rank(vname, module)
            g_local = spec.num_query_groups // tp
            if (getattr(module, "num_kv_head_replicas", 1) != 1 or module.num_kv_heads != g_local
                    or module.num_heads != g_local * per or module.head_size != d):
                raise NotApplicable(f"{vname}: vLLM heads {module.num_heads}/{module.num_kv_heads}x{module.head_size} "
                                    f"(replicas {getattr(module, 'num_kv_head_replicas', 1)}) != Megatron "
                                    f"{g_local * per}/{g_local}x{d}")
            if dst.shape != src.shape:
                raise NotApplicable(f"{vname}: vLLM shard {tuple(dst.shape)} != Megatron shard {tuple(src.shape)}")
            rows = _qkv_rows(g_local, per, d, src.device)
            plan.gathers.append((dst.data, src, rows))
            written[vname] = dst.shape[0]
        elif rule.kind == "vocab":
            vname, _, dst, module = target(hf_names[0])
            check_rank(vname, module)
            si = getattr(module, "shard_indices", None)
            if si is None:
                raise NotApplicable(f"{vname}: not a VocabParallelEmbedding")
            rows_m = spec.padded_vocab_size // tp
            start, n = si.org_vocab_start_index, si.org_vocab_end_index - si.org_vocab_start_index
            if start != tp_rank * rows_m or n > rows_m or dst.shape[1:] != src.shape[1:]:
                raise NotApplicable(f"{vname}: vLLM vocab shard [{start}, {start + n}) does not line up with "
                                    f"Megatron's [{tp_rank * rows_m}, {(tp_rank + 1) * rows_m})")
            plan.copies.append((dst.data[:n], src[:n]))
            if dst.shape[0] > n:
                plan.zeros.append(dst.data[n:])
            written[vname] = dst.shape[0]
        else:
            raise NotApplicable(f"no fast-path operation for rule kind {rule.kind!r}")
        plan.n_hf_tensors += len(hf_names)
    missing = sorted(set(vparams) - set(written))
    if missing:
        raise NotApplicable(f"vLLM parameters the plan does not write: {missing[:5]}")
    for vname, p in vparams.items():
        plan.watched.append(p)
    plan.nbytes = sum(d_.numel() * d_.element_size() for d_, _ in plan.copies) + \
        sum(d_.numel() * d_.element_size() for d_, _, _ in plan.gathers)
    return plan


SMALL_BYTES = 1 << 20  # below this a copy is launch-bound: batch those into one multi-tensor copy


@torch.no_grad()
def run_plan(plan: Plan, mode: str = "hybrid") -> None:
    """Issue the plan's copies eagerly.

    ``"hybrid"``: one ``copy_`` per large tensor (full-bandwidth copy kernels) and one
    multi-tensor ``_foreach_copy_`` for all tensors under `SMALL_BYTES` (norms, biases);
    ``"foreach"``: one multi-tensor copy for everything; ``"loop"``: one ``copy_`` each.
    """
    if mode == "loop":
        for dst, src in plan.copies:
            dst.copy_(src)
    elif mode == "hybrid":
        small = [(d, s) for d, s in plan.copies if d.numel() * d.element_size() < SMALL_BYTES]
        for dst, src in plan.copies:
            if dst.numel() * dst.element_size() >= SMALL_BYTES:
                dst.copy_(src)
        if small:
            torch._foreach_copy_([c[0] for c in small], [c[1] for c in small])
    elif plan.copies:
        torch._foreach_copy_([c[0] for c in plan.copies], [c[1] for c in plan.copies])
    for dst, src, rows in plan.gathers:
        if dst.dtype == src.dtype:
            torch.index_select(src, 0, rows, out=dst)
        else:
            dst.copy_(src.index_select(0, rows))
    for z in plan.zeros:
        z.zero_()


class FastSync:
    """Weight sync into a `VLLMEngine` by a precomputed copy plan (see module doc).

    ``mode``: ``"graph"`` (the ``"hybrid"`` copies captured once in a CUDA graph; default on
    CUDA), or eager: ``"hybrid"`` (large tensors one ``copy_`` each, small ones in one
    multi-tensor copy), ``"foreach"`` (one multi-tensor copy for all), ``"loop"`` (one
    ``copy_`` each); QKV is one row gather per tensor in every mode. All write the same bytes.
    """

    def __init__(self, mcore_model, engine, mode: str | None = None):
        if getattr(engine, "on_cpu", False):
            raise NotApplicable("vLLM on CPU repacks linear weights (oneDNN); use Resharder")
        self.model, self.engine = mcore_model, engine
        self.mode = mode or ("graph" if torch.cuda.is_available() else "hybrid")
        if self.mode not in ("graph", "hybrid", "foreach", "loop"):
            raise ValueError(f"mode must be graph, hybrid, foreach or loop, got {self.mode!r}")
        self._wake()
        t0 = time.perf_counter()
        self.plan = build_plan(mcore_model, engine.model())
        self.plan_seconds = time.perf_counter() - t0
        self._graph = None
        self._ptrs = None
        self.graph_error: str | None = None
        self.captures = 0  # CUDA graph captures so far (1 unless a parameter's storage moved)

    def _wake(self):
        if getattr(self.engine, "_asleep", False) and getattr(self.engine, "sleep_enabled", False):
            self.engine.wake_up(tags=["weights"])

    def _ptr_key(self):
        return tuple(p.data_ptr() for p in self.plan.watched)

    def _eager(self, mode: str):
        run_plan(self.plan, mode)

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
        """Issue the copies (asynchronous on CUDA); no engine bookkeeping."""
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
        """Load the actor's weights into the engine; same stats as `Resharder.sync`."""
        self._wake()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.copy()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.engine.llm.reset_prefix_cache()
        return {"sync/seconds": dt, "sync/bytes": self.plan.nbytes, "sync/tensors": self.plan.n_hf_tensors,
                "sync/GBps": self.plan.nbytes / dt / 1e9 if dt > 0 else 0.0, "sync/graph_captures": self.captures,
                "sync/prefix_reset_s": time.perf_counter() - t0 - dt}


def snapshot(vllm_model, device=None) -> dict[str, torch.Tensor]:
    """A copy of every vLLM parameter (for bit-exact comparisons), on `device` (default: its own)."""
    return {n: p.detach().to(device, copy=True) if device is not None else p.detach().clone()
            for n, p in vllm_model.named_parameters()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (or are missing on one side); `b` may live on
    another device than `a` (compared one tensor at a time on `b`'s device)."""
    bad = sorted(set(a) ^ set(b))
    for n in sorted(set(a) & set(b)):
        x, y = a[n], b[n].detach()
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(_bits(x.to(y.device).contiguous()),
                                                                        _bits(y.contiguous())):
            bad.append(n)
    return bad


@torch.no_grad()
def check_against_hf_path(mcore_model, engine, resharder=None, fast: FastSync | None = None) -> list[str]:
    """Bit-exact oracle: load with the HF-named path, snapshot, scramble, load with the fast
    path, compare every vLLM parameter. Returns the names that differ (empty: identical).
    The snapshot is kept on the GPU when it fits with room to spare, else in host memory."""
    from mcore_rl.resharding import Resharder

    resharder = resharder or Resharder(mcore_model)
    fast = fast or FastSync(mcore_model, engine)
    resharder.sync_hf(engine)
    model = engine.model()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    on_gpu = torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 1.5 * nbytes + (4 << 30)
    ref = snapshot(model, None if on_gpu or not torch.cuda.is_available() else torch.device("cpu"))
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for p in model.parameters():  # scramble, so that a missed copy shows
        p.data.normal_(generator=g) if p.dtype.is_floating_point else p.data.zero_()
    fast.sync()
    return compare(ref, dict(model.named_parameters()))
