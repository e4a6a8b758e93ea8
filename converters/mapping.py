"""The HF <-> Megatron mapping: one table per architecture, and the transforms it names.

This is the only place the mapping lives. The offline converter, the in-memory loader and
the live resharder all go through `rules_for(spec)` and the two transform functions:

- `hf_to_mcore(rule, hf_tensors, spec, tp_rank, tp_size)`: the Megatron shard this TP rank
  holds, from the full HF tensors the rule names.
- `mcore_to_hf(rule, shards, spec)`: the full HF tensors, from every TP rank's shard (in TP
  rank order).

Transforms (`Rule.kind`):
- `repl`:   same tensor on every TP rank (norms, row-parallel biases, position embeddings).
- `col`:    column-parallel, split on dim 0.
- `row`:    row-parallel, split on dim 1.
- `vocab`:  vocab-parallel embedding / output layer: rows padded with zeros to
            `spec.padded_vocab_size`, then split on dim 0; the padding is dropped on export.
- `qkv`:    q, k, v fused as Megatron does, per query group: [q_g (heads/groups rows of
            head_dim); k_g; v_g] for each group g, then split on dim 0 (whole groups per rank).
- `gate_up`: gate and up projections fused per TP rank: rank r holds [gate_r; up_r].

LoRA adapters (`mcore_rl.models.lora`) have rules of their own, made from the base rules of the
linear layers they adapt (`lora_rules`): one adapter per HF module (q_proj, k_proj, v_proj
separately even where Megatron fuses them), named as peft saves it (without peft's
``base_model.model.`` prefix). On a column-parallel base (`qkv`, `gate_up`, `col`) A is `repl`
and B is `col` (split like the base's rows); on a row-parallel base (`row`) A is `row` and B
`repl`. In Megatron they live in a sibling of the linear, ``<linear>_lora.lora_A.<hf module>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mcore_rl.models.arch import ArchSpec

LAYER = "{i}"


@dataclass(frozen=True)
class Rule:
    mcore: str                 # Megatron (local spec) name; "{i}" is the global layer index
    hf: tuple[str, ...]        # HF names, in the order the transform takes them
    kind: str                  # repl | col | row | vocab | qkv | gate_up
    te_mcore: str | None = None  # the name under the TransformerEngine spec, where different

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore

    def mcore_name(self, layer: int | None = None, te: bool = False) -> str:
        name = (self.te_mcore if te and self.te_mcore else self.mcore)
        return name.replace(LAYER, str(layer)) if layer is not None else name

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [n.replace(LAYER, str(layer)) if layer is not None else n for n in self.hf]


def _llama_like(spec: ArchSpec) -> list[Rule]:
    a, m = "decoder.layers.{i}.self_attention", "decoder.layers.{i}.mlp"
    h = "model.layers.{i}"
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        Rule("decoder.layers.{i}.input_layernorm.weight", (f"{h}.input_layernorm.weight",), "repl",
             te_mcore=f"{a}.linear_qkv.layer_norm_weight"),
        Rule(f"{a}.linear_qkv.weight", tuple(f"{h}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        Rule(f"{a}.linear_proj.weight", (f"{h}.self_attn.o_proj.weight",), "row"),
        Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", (f"{h}.post_attention_layernorm.weight",), "repl",
             te_mcore=f"{m}.linear_fc1.layer_norm_weight"),
        Rule(f"{m}.linear_fc1.weight", (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"), "gate_up"),
        Rule(f"{m}.linear_fc2.weight", (f"{h}.mlp.down_proj.weight",), "row"),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "repl"),
    ]
    if spec.qkv_bias:
        rules.append(Rule(f"{a}.linear_qkv.bias", tuple(f"{h}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"))
    if spec.qk_layernorm:
        rules += [Rule(f"{a}.q_layernorm.weight", (f"{h}.self_attn.q_norm.weight",), "repl"),
                  Rule(f"{a}.k_layernorm.weight", (f"{h}.self_attn.k_norm.weight",), "repl")]
    if not spec.tied_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def _opt(spec: ArchSpec) -> list[Rule]:
    a, m, h = "decoder.layers.{i}.self_attention", "decoder.layers.{i}.mlp", "model.decoder.layers.{i}"
    rules = [
        Rule("embedding.word_embeddings.weight", ("model.decoder.embed_tokens.weight",), "vocab"),
        Rule("embedding.position_embeddings.weight", ("model.decoder.embed_positions.weight",), "repl"),
        Rule(f"{a}.linear_qkv.weight", tuple(f"{h}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
        Rule(f"{a}.linear_qkv.bias", tuple(f"{h}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
        Rule(f"{a}.linear_proj.weight", (f"{h}.self_attn.out_proj.weight",), "row"),
        Rule(f"{a}.linear_proj.bias", (f"{h}.self_attn.out_proj.bias",), "repl"),
        Rule(f"{m}.linear_fc1.weight", (f"{h}.fc1.weight",), "col"),
        Rule(f"{m}.linear_fc1.bias", (f"{h}.fc1.bias",), "col"),
        Rule(f"{m}.linear_fc2.weight", (f"{h}.fc2.weight",), "row"),
        Rule(f"{m}.linear_fc2.bias", (f"{h}.fc2.bias",), "repl"),
        Rule("decoder.final_layernorm.weight", ("model.decoder.final_layer_norm.weight",), "repl"),
        Rule("decoder.final_layernorm.bias", ("model.decoder.final_layer_norm.bias",), "repl"),
    ]
    for p in ("weight", "bias"):
        rules += [
            Rule(f"decoder.layers.{{i}}.input_layernorm.{p}", (f"{h}.self_attn_layer_norm.{p}",), "repl",
                 te_mcore=f"{a}.linear_qkv.layer_norm_{p}"),
            Rule(f"decoder.layers.{{i}}.pre_mlp_layernorm.{p}", (f"{h}.final_layer_norm.{p}",), "repl",
                 te_mcore=f"{m}.linear_fc1.layer_norm_{p}"),
        ]
    if not spec.tied_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


TABLES = {"llama": _llama_like, "qwen2": _llama_like, "qwen3": _llama_like, "mistral": _llama_like, "opt": _opt}


def rules_for(spec: ArchSpec) -> list[Rule]:
    return TABLES[spec.family](spec)


COLUMN_KINDS = ("qkv", "gate_up", "col")  # column-parallel linear weights (row-parallel: "row")
LORA = "_lora"  # a linear's adapters: the module ``<linear>_lora`` next to it


def lora_linears(spec: ArchSpec) -> list[Rule]:
    """The base rules LoRA can adapt: the per-layer linear weights (not embeddings, norms, biases)."""
    return [r for r in rules_for(spec)
            if r.per_layer and r.kind in (*COLUMN_KINDS, "row") and r.mcore.endswith(".weight")]


def hf_module(hf_name: str) -> str:
    """The HF module of a weight name: ``model.layers.{i}.self_attn.q_proj.weight`` -> ``q_proj``."""
    return hf_name.removesuffix(".weight").rsplit(".", 1)[-1]


def lora_targets(spec: ArchSpec) -> tuple[str, ...]:
    """The HF linear module names of the model's layers (peft's ``all-linear``), in layer order."""
    return tuple(hf_module(n) for r in lora_linears(spec) for n in r.hf)


def lora_rules(spec: ArchSpec, targets) -> list[Rule]:
    """Rules of the adapters of the `targets` modules (see the module doc), in base-rule order."""
    rules = []
    for base in lora_linears(spec):
        linear, column = base.mcore.removesuffix(".weight"), base.kind in COLUMN_KINDS
        for hf in base.hf:
            name = hf_module(hf)
            if name in targets:
                module = hf.removesuffix(".weight")
                rules += [Rule(f"{linear}{LORA}.lora_A.{name}", (f"{module}.lora_A.weight",), "repl" if column else "row"),
                          Rule(f"{linear}{LORA}.lora_B.{name}", (f"{module}.lora_B.weight",), "col" if column else "repl")]
    return rules


def is_lora(name: str) -> bool:
    """Whether a Megatron parameter name is a LoRA adapter's."""
    return f"{LORA}." in name


def hf_counterpart(name: str, spec: ArchSpec, role: str = "actor") -> str | None:
    """The Megatron parameter whose HF tensors `name` holds: `name` itself; the embedding for
    the output layer of a tied model (a last PP stage's copy of it); None for the critic's
    output layer (the value head is new: no HF tensor corresponds to it)."""
    if name.startswith("output_layer."):
        if role == "critic":
            return None
        if name == "output_layer.weight" and spec.tied_embeddings:
            return "embedding.word_embeddings.weight"
    return name


def qkv_rows(groups: int, per: int, d: int, device=None) -> torch.Tensor:
    """Row permutation from Megatron's fused QKV to HF's: row i of [q; k; v] is row
    ``rows[i]`` of Megatron's per-group [q_g (per * d rows); k_g (d); v_g (d)] for each group.

    Holds for any run of whole groups (a TP rank's shard: `groups` = its local groups)."""
    g = torch.arange(groups, device=device).view(-1, 1) * (per + 2) * d
    q = (g + torch.arange(per * d, device=device)).reshape(-1)
    k = (g + per * d + torch.arange(d, device=device)).reshape(-1)
    v = (g + (per + 1) * d + torch.arange(d, device=device)).reshape(-1)
    return torch.cat([q, k, v])


class NameIndex:
    """Looks up the rule and global layer of a Megatron parameter name, and of an HF name;
    with `lora` (targeted HF module names), of the adapters' names too."""

    _layer = re.compile(r"(?<=layers\.)(\d+)(?=\.)")

    def __init__(self, spec: ArchSpec, te: bool = False, lora=()):
        self.spec, self.te = spec, te
        self.rules = rules_for(spec) + (lora_rules(spec, lora) if lora else [])
        self._by_mcore = {r.mcore_name(te=te): r for r in self.rules}
        self._by_hf = {n: r for r in self.rules for n in r.hf}

    def _split(self, name: str) -> tuple[str, int | None]:
        m = self._layer.search(name)
        if not m:
            return name, None
        return name[: m.start()] + LAYER + name[m.end():], int(m.group(1))

    def mcore(self, name: str) -> tuple[Rule, int | None]:
        """Rule and layer index for a Megatron name whose layer index is already global."""
        key, layer = self._split(name)
        if key not in self._by_mcore:
            raise KeyError(f"no {self.spec.family} mapping for Megatron parameter {name!r}")
        return self._by_mcore[key], layer

    def hf(self, name: str) -> tuple[Rule, int | None]:
        key, layer = self._split(name)
        if key not in self._by_hf:
            raise KeyError(f"no {self.spec.family} mapping for HF tensor {name!r}")
        return self._by_hf[key], layer

    def all_hf_names(self) -> list[str]:
        names = []
        for r in self.rules:
            for layer in (range(self.spec.num_layers) if r.per_layer else [None]):
                names += r.hf_names(layer)
        return names


def _chunk(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.size(dim) % size:
        raise ValueError(f"dimension {dim} of size {t.size(dim)} is not divisible by TP={size}")
    return t.chunk(size, dim=dim)[rank]


def hf_to_mcore(rule: Rule, hf: list[torch.Tensor], spec: ArchSpec, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    kind = rule.kind
    if kind == "repl":
        return hf[0]
    if kind == "col":
        return _chunk(hf[0], 0, tp_rank, tp_size)
    if kind == "row":
        return _chunk(hf[0], 1, tp_rank, tp_size)
    if kind == "vocab":
        t = hf[0]
        pad = spec.padded_vocab_size - t.size(0)
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return _chunk(t, 0, tp_rank, tp_size)
    if kind == "qkv":
        g, d = spec.num_query_groups, spec.head_dim
        if g % tp_size:
            raise ValueError(f"{g} query groups are not divisible by TP={tp_size}")
        qkv = torch.cat(hf)  # [q; k; v]
        fused = qkv.index_select(0, torch.argsort(qkv_rows(g, spec.num_attention_heads // g, d, qkv.device)))
        return _chunk(fused, 0, tp_rank, tp_size)  # whole groups per rank
    if kind == "gate_up":
        gate, up = hf
        return torch.cat([_chunk(gate, 0, tp_rank, tp_size), _chunk(up, 0, tp_rank, tp_size)])
    raise ValueError(f"unknown transform {kind!r}")


VLLM_VOCAB_PAD = 64  # vLLM pads a vocab-parallel layer's rows to a multiple of this, then splits them


def rollout_part(rule: Rule, part: int, shape: torch.Size, spec: ArchSpec, tp_rank: int,
                 tp_size: int) -> tuple[int, int, int] | None:
    """What TP rank `tp_rank` of a rollout engine of TP `tp_size` reads of an HF tensor: ``(dim,
    start, length)``, or None for all of it. `part` is the tensor's place in ``rule.hf``.

    vLLM's loaders take a full HF tensor and narrow it to exactly this, so a rank that is sent only
    this part can hand its loader any full-shaped tensor holding it there. Key/value heads fewer
    than the ranks are replicated: rank r reads group ``r // (tp_size / groups)``."""
    kind = rule.kind
    if tp_size == 1 or kind == "repl":
        return None
    if kind in ("col", "gate_up"):
        return 0, *_even(shape[0], tp_rank, tp_size)
    if kind == "row":
        return 1, *_even(shape[1], tp_rank, tp_size)
    if kind == "vocab":
        per = -(-shape[0] // VLLM_VOCAB_PAD) * VLLM_VOCAB_PAD // tp_size
        start = min(tp_rank * per, shape[0])
        return 0, start, min(start + per, shape[0]) - start
    if kind == "qkv":
        g, d = spec.num_query_groups, spec.head_dim
        if part == 0 or g >= tp_size:
            return 0, *_even(shape[0], tp_rank, tp_size)
        if tp_size % g:
            raise ValueError(f"{g} key/value heads cannot be replicated over rollout TP={tp_size}")
        return 0, tp_rank // (tp_size // g) * d, d
    raise ValueError(f"unknown transform {kind!r}")


def _even(n: int, rank: int, size: int) -> tuple[int, int]:
    if n % size:
        raise ValueError(f"dimension of size {n} is not divisible by TP={size}")
    return rank * n // size, n // size


def mcore_to_hf(rule: Rule, shards: list[torch.Tensor], spec: ArchSpec) -> list[torch.Tensor]:
    """Inverse of `hf_to_mcore`: `shards` are the TP ranks' tensors in rank order."""
    kind = rule.kind
    if kind == "repl":
        return [shards[0]]
    if kind == "col":
        return [torch.cat(shards, 0)]
    if kind == "row":
        return [torch.cat(shards, 1)]
    if kind == "vocab":
        return [torch.cat(shards, 0)[: spec.vocab_size]]
    if kind == "qkv":
        g, d = spec.num_query_groups, spec.head_dim
        per = spec.num_attention_heads // g
        full = torch.cat(shards, 0)
        qkv = full.index_select(0, qkv_rows(g, per, d, full.device))
        return list(qkv.split([g * per * d, g * d, g * d]))
    if kind == "gate_up":
        halves = [s.chunk(2, 0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    raise ValueError(f"unknown transform {kind!r}")
