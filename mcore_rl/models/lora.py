"""LoRA adapters on the Megatron linear layers of the actor, TP- and PP-aware.

One adapter per targeted HF module, peft's parametrisation exactly: the module's output gains
``scaling * B @ A @ x`` with ``scaling = alpha / rank``, A initialised like peft (Kaiming
uniform, a = sqrt(5)) and B zero, so a fresh adapter leaves the model unchanged. Where Megatron
fuses several HF modules into one linear (q/k/v into ``linear_qkv``, gate/up into
``linear_fc1``) each keeps its own adapter, and their outputs are assembled into the fused
output layout of this TP rank (`converters.mapping`: per local query group [q_g; k_g; v_g];
[gate_r; up_r]); a module not targeted contributes zero rows.

Tensor parallelism (no sequence parallelism), as Megatron's own linears:

* column-parallel base (``linear_qkv``, ``linear_fc1``): A [r, in] replicated, B split on its
  rows like the base; ``h = A x`` goes through `copy_to_tensor_model_parallel_region`, so the
  gradient of h, hence of A, is the full one on every rank;
* row-parallel base (``linear_proj``, ``linear_fc2``): A split on its input dim like the base,
  ``h = A_r x_r`` summed over TP by `reduce_from_tensor_model_parallel_region`; B replicated.

The adapters of a linear live in a sibling module ``<linear>_lora`` (`LoRALinear`) and are added
to the linear's output by a forward hook: the base parameters keep their names (the converter's
mapping still applies) and the sibling's `sharded_state_dict` marks exactly the split halves as
TP-sharded, so megatron's distributed checkpoints hold whole adapters at any TP. The adapters'
own names, HF names (peft's) and TP splits are rules in `converters.mapping` (`lora_rules`), so
gathering them (`converters.gather.iter_lora_tensors`) and loading them (`load_adapters`) use
the converter's machinery. `converters.gather.iter_hf_tensors` yields the merged weights
(``W + scaling * B @ A``, computed on each TP rank's own shard), which is what the rollout
engine is given. `disabled` switches the adapters off: the base model, i.e. the reference policy.

Why not peft's Megatron LoRA (``LoraParallelLinear``): it puts one adapter on a fused Megatron
module, so ``q_proj,v_proj`` cannot be expressed and its gradients differ from peft on the HF
model; it renames the base weights (``linear_qkv.base_layer.weight``), which breaks the
converter's names; its modules have no `sharded_state_dict`, so megatron's checkpointing would
save TP-split adapter halves as replicated (wrong at TP > 1); and it overwrites the shared
TransformerConfig's ``params_dtype``.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from converters.adapter import merge
from converters.mapping import (COLUMN_KINDS, LORA, NameIndex, hf_module, hf_to_mcore, is_lora, lora_linears,
                                lora_targets, mcore_to_hf)
from mcore_rl.models.arch import ArchSpec

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]  # HF module names: q_proj, v_proj, ...

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def parse_targets(target_modules) -> list[str]:
    """`all-linear`, a list, or a comma-separated string of module names -> the names as given."""
    if isinstance(target_modules, str):
        names = [n.strip() for n in target_modules.split(",")]
    else:
        names = [str(n).strip() for n in target_modules]
    return [n for n in names if n]


def resolve_targets(target_modules, spec: ArchSpec) -> tuple[str, ...]:
    """The model's HF module names that `target_modules` selects (ValueError naming the valid ones)."""
    valid = lora_targets(spec)
    names = parse_targets(target_modules)
    if names == [ALL_LINEAR]:
        return valid
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"actor_rollout_ref.model.target_modules: {', '.join(unknown) or 'nothing'} "
                         f"{'is' if len(unknown) == 1 else 'are'} not a linear module of this {spec.family} model; "
                         f"valid: {ALL_LINEAR} or any of {', '.join(valid)}")
    return tuple(n for n in valid if n in names)


def lora_config(model_cfg, spec: ArchSpec) -> LoRAConfig | None:
    """The LoRA of `actor_rollout_ref.model` (``lora_rank``, ``lora_alpha``, ``target_modules``);
    None when ``lora_rank`` is 0."""
    if not model_cfg.lora_rank:
        return None
    return LoRAConfig(int(model_cfg.lora_rank), float(model_cfg.lora_alpha),
                      resolve_targets(model_cfg.target_modules, spec))


def config_problems(model_cfg) -> list[str]:
    """What is wrong with the LoRA keys of `actor_rollout_ref.model` before the model is known."""
    if not model_cfg.lora_rank:
        return []
    where, problems = "actor_rollout_ref.model", []
    if model_cfg.transformer_impl == "transformer_engine":
        problems.append(f"{where}.lora_rank={model_cfg.lora_rank} needs transformer_impl=local (TransformerEngine's "
                        f"fused layernorm-linear hides the normalised input the adapters read)")
    names = model_cfg.target_modules
    if not isinstance(names, str) and not all(isinstance(n, str) for n in names):
        problems.append(f"{where}.target_modules must be {ALL_LINEAR}, a list of module names or a comma-separated "
                        f"string of them")
    elif not parse_targets(names):
        problems.append(f"{where}.target_modules is empty (lora_rank={model_cfg.lora_rank}); use {ALL_LINEAR} or "
                        f"module names such as q_proj,v_proj")
    elif ALL_LINEAR in parse_targets(names) and len(parse_targets(names)) > 1:
        problems.append(f"{where}.target_modules: {ALL_LINEAR} goes alone, not with other names")
    return problems


class LoRALinear(torch.nn.Module):
    """The adapters of one Megatron linear: ``lora_A[m]``, ``lora_B[m]`` for each targeted HF module m
    (this rank's shards). `__call__(x)` is what they add to the linear's output.

    `parts`: the HF modules the linear fuses, in the converter's order, with their rows on this
    rank; `rows[j]`: where row j of the fused output (Megatron's order) sits in [part 0; part 1;
    ...] (None: the same order).
    """

    def __init__(self, parts: list[tuple[str, int]], targets, column: bool, rank: int, scaling: float,
                 in_features: int, out_features: int, rows: torch.Tensor | None, dtype, device):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.parts, self.column, self.scaling, self.enabled = parts, column, scaling, True
        self.lora_A, self.lora_B = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for name, out_rows in parts:
            if name not in targets:
                continue
            a = torch.nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
            b = torch.nn.Parameter(torch.zeros(out_rows if column else out_features, rank, dtype=dtype, device=device))
            # the TP-split half of each adapter (counted on every rank by grad-norm clipping)
            set_tensor_model_parallel_attributes(b if column else a, is_parallel=True, dim=0 if column else 1, stride=1)
            self.lora_A[name], self.lora_B[name] = a, b
        self.register_buffer("rows", rows.to(device) if rows is not None else None, persistent=False)

    def _a(self) -> torch.Tensor:
        """[r * targeted modules, in]: the A's stacked."""
        return torch.cat([a for a in self.lora_A.values()])

    def _b(self) -> torch.Tensor:
        """[out rows of this rank, r * targeted modules], in the linear's fused row order (zero rows
        for modules not targeted)."""
        a = next(iter(self.lora_A.values()))
        blocks = [self.lora_B[n] if n in self.lora_B else a.new_zeros(rows, 0) for n, rows in self.parts]
        b = torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0]
        return b if self.rows is None else b.index_select(0, self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                            reduce_from_tensor_model_parallel_region)

        h = F.linear(x, self._a())
        h = copy_to_tensor_model_parallel_region(h) if self.column else reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self._b()) * self.scaling

    def hook(self, module, args, output):
        """Forward hook on the base linear: add the adapters' output to its output (not its bias)."""
        if not self.enabled:
            return output
        out, bias = output
        return out + self(args[0]), bias

    @torch.no_grad()
    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the base `weight` with the adapters merged in (fp32 math, `weight`'s
        dtype): both factors of the product are this rank's, column- or row-parallel alike."""
        return merge(weight, self._a(), self._b(), self.scaling)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """B split on dim 0 (column-parallel base) or A on dim 1 (row-parallel), the other replicated."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        split = {f"lora_B.{n}": 0 for n in self.lora_B} if self.column else {f"lora_A.{n}": 1 for n in self.lora_A}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, split, sharded_offsets,
            tp_group=ps.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])


def _generator(seed: int, layer: int, name: str) -> torch.Generator:
    """The same stream for (seed, global layer, module) whatever the TP/PP layout."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}/{name}".encode()))


def _fused_rows(base_rule, parts, hf_shapes, spec, tp_rank: int, tp: int) -> torch.Tensor | None:
    """Where each row of this rank's fused output sits in [part 0 rows of this rank; part 1; ...]:
    the converter's own split applied to row numbers. None when that is the identity."""
    codes, start = [], 0
    for (_, local), shape in zip(parts, hf_shapes):
        code = torch.full((shape[0], 1), -1, dtype=torch.long)
        code[tp_rank * local:(tp_rank + 1) * local, 0] = torch.arange(start, start + local)
        codes.append(code)
        start += local
    rows = hf_to_mcore(base_rule, codes, spec, tp_rank, tp)[:, 0]
    return None if torch.equal(rows, torch.arange(len(rows))) else rows


def add_lora(model, config: LoRAConfig, seed: int = 0) -> None:
    """Give this rank's shard of `model` (a GPTModel, base weights loaded) the adapters of `config`
    and freeze everything else (before DDP and the optimizer are built: they take only trainable
    parameters).

    Each adapter is drawn whole from a generator seeded by (seed, global layer, module), then
    split with the converter's rules, so the initial model is the same at any TP/PP."""
    from megatron.core import parallel_state as ps

    spec = model.mcore_rl_spec
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    meta = lambda shape: torch.empty(shape, device="meta")  # noqa: E731
    full = {}
    for local, layer in enumerate(model.decoder.layers):
        g = layer.layer_number - 1
        for rule in lora_linears(spec):
            names = [hf_module(n) for n in rule.hf]
            if not set(names) & set(config.targets):
                continue
            path = rule.mcore_name(local).removesuffix(".weight")
            base = model.get_submodule(path)
            w = base.weight
            hf_shapes = [t.shape for t in mcore_to_hf(rule, [meta(w.shape)] * tp, spec)]
            column = rule.kind in COLUMN_KINDS
            parts = [(n, s[0] // tp if column else s[0]) for n, s in zip(names, hf_shapes)]
            adapter = LoRALinear(parts, config.targets, column, config.rank, config.scaling, w.shape[1], w.shape[0],
                                 _fused_rows(rule, parts, hf_shapes, spec, tp_rank, tp) if column else None,
                                 w.dtype, w.device)
            parent, linear = path.rsplit(".", 1)
            model.get_submodule(parent).add_module(f"{linear}{LORA}", adapter)
            base.register_forward_hook(adapter.hook)
            for hf, name, (_, fan_in) in zip(rule.hf_names(g), names, hf_shapes):
                if name in config.targets:
                    a = torch.empty(config.rank, fan_in)
                    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=_generator(seed, g, name))
                    module = hf.removesuffix(".weight")
                    full[f"{module}.lora_A.weight"] = a
                    full[f"{module}.lora_B.weight"] = torch.zeros(hf_shapes[names.index(name)][0], config.rank)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora(name))
    model.mcore_rl_lora = config
    load_adapters(model, full)


def lora_of(model) -> LoRAConfig | None:
    """The model's LoRA (None without adapters); `model` may be DDP-wrapped."""
    return getattr(model.module if hasattr(model, "module") else model, "mcore_rl_lora", None)


def adapters(model) -> dict[str, LoRALinear]:
    """{this rank's (local) name of a base linear weight: its adapters}."""
    inner = model.module if hasattr(model, "module") else model
    return {name.removesuffix(LORA) + ".weight": m for name, m in inner.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def load_adapters(model, tensors) -> None:
    """Set this rank's adapter shards from full HF-named (peft) tensors, any TP/PP: `tensors` maps
    each adapter's HF name (``model.layers.0.self_attn.q_proj.lora_A.weight``) to its tensor."""
    from megatron.core import parallel_state as ps

    from converters.hf_io import global_layer_offset, local_to_global

    inner = model.module if hasattr(model, "module") else model
    spec, config = inner.mcore_rl_spec, lora_of(inner)
    index, offset = NameIndex(spec, lora=config.targets), global_layer_offset(inner)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, p in inner.named_parameters():
        if is_lora(name):
            rule, layer = index.mcore(local_to_global(name, offset))
            shard = hf_to_mcore(rule, [tensors[n] for n in rule.hf_names(layer)], spec, tp_rank, tp)
            if shard.shape != p.shape:
                raise ValueError(f"{rule.hf_names(layer)[0]}: shape {tuple(shard.shape)} on this rank, the model has "
                                 f"{tuple(p.shape)} (another lora_rank?)")
            p.copy_(shard)


@contextlib.contextmanager
def disabled(model):
    """The base model inside the block: every adapter off (the reference policy of a LoRA actor)."""
    mods = list(adapters(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def trainable_params(model) -> int:
    """Parameters of the whole model (all TP and PP ranks) that train: TP-split ones summed over TP,
    replicated ones once. Collective over the TP and PP groups."""
    from megatron.core import parallel_state as ps

    from mcore_rl.distributed.comm import all_reduce_scalars

    trainable = [p for p in (model.module if hasattr(model, "module") else model).parameters() if p.requires_grad]
    split = sum(p.numel() for p in trainable if getattr(p, "tensor_model_parallel", False))
    whole = sum(p.numel() for p in trainable) - split
    split = all_reduce_scalars([split], ps.get_tensor_model_parallel_group())[0]
    return int(all_reduce_scalars([split + whole], ps.get_pipeline_model_parallel_group())[0])
