"""What a HuggingFace `config.json` means for a megatron-core GPTModel.

`ArchSpec` is the one reading of an HF config that every other part uses (model builder,
converter table, resharder, rollout engines, memory planner). Anything we cannot represent
exactly fails here, with the feature named, instead of producing a model that is silently
different from the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "OPTForCausalLM": "opt",
}
VOCAB_PAD_MULTIPLE = 128  # padded vocab is TP-independent so checkpoints reshard freely


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ArchSpec:
    family: str
    hf_architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-6
    gated_mlp: bool = True
    activation: str = "silu"
    linear_bias: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    position_embedding: str = "rope"  # rope | learned_absolute
    position_offset: int = 0  # OPT stores 2 extra position rows and starts at index 2
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tied_embeddings: bool = False
    hf_config: dict = field(default_factory=dict, repr=False)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def check_parallel(self, tp: int = 1, pp: int = 1) -> None:
        """Fail with the numbers before any process group forms."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by TP={tp}")
        if self.num_query_groups % tp:
            problems.append(f"num_key_value_heads={self.num_query_groups} is not divisible by TP={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"intermediate_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.padded_vocab_size % tp:
            problems.append(f"padded vocab {self.padded_vocab_size} is not divisible by TP={tp}")
        if self.num_layers % pp:
            problems.append(f"num_hidden_layers={self.num_layers} is not divisible by PP={pp}")
        if problems:
            raise ValueError(f"{self.hf_architecture} cannot be split at TP={tp}, PP={pp}: " + "; ".join(problems))

    def num_params(self) -> int:
        """Parameter count of the HF model (unpadded vocab), used by planners and benchmarks."""
        h, f, L, V = self.hidden_size, self.ffn_hidden_size, self.num_layers, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_query_groups * self.head_dim
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.linear_bias else 0)
        mlp = h * f * (3 if self.gated_mlp else 2) + ((f + h) if self.linear_bias else 0)
        qk = 2 * self.head_dim if self.qk_layernorm else 0
        per_layer = attn + mlp + 2 * norm + qk
        emb = V * h * (1 if self.tied_embeddings else 2)
        pos = (self.max_position_embeddings + self.position_offset) * h if self.position_embedding == "learned_absolute" else 0
        return L * per_layer + emb + pos + norm


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """rope theta and scaling, from either the transformers<5 (`rope_theta`, `rope_scaling`)
    or the transformers>=5 (`rope_parameters`) layout of config.json."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (supported: default, llama3)")
    src = scaling or params
    return float(theta), {k: src[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}


def arch_from_hf_config(cfg: dict | str | os.PathLike) -> ArchSpec:
    """Read an HF config (dict, config.json path or checkpoint dir) into an ArchSpec."""
    if not isinstance(cfg, dict):
        path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else str(cfg)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            cfg = json.load(f)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else {
        "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM", "opt": "OPTForCausalLM"}.get(cfg.get("model_type"), cfg.get("model_type"))
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED))}")
    family = SUPPORTED[arch]
    if family == "opt":
        return _opt(cfg, arch)

    def unsupported(feature):
        raise UnsupportedModelError(f"{arch}: {feature} is not supported")

    if cfg.get("attention_bias") and family in ("llama", "mistral"):
        unsupported("attention_bias=true")
    if cfg.get("mlp_bias"):
        unsupported("mlp_bias=true")
    if cfg.get("use_sliding_window") and family in ("qwen2", "qwen3"):
        unsupported("use_sliding_window=true")
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported(f"hidden_act={cfg.get('hidden_act')!r} (only silu)")
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope(cfg)
    max_pos = cfg["max_position_embeddings"]
    if family == "mistral" and cfg.get("sliding_window"):
        # Within the window a sliding-window model is an ordinary causal model: cap the length.
        max_pos = min(max_pos, cfg["sliding_window"])
    return ArchSpec(
        family=family, hf_architecture=arch,
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"], max_position_embeddings=max_pos,
        normalization="RMSNorm", norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2", qk_layernorm=family == "qwen3",
        rope_theta=theta, rope_scaling=scaling,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), hf_config=cfg)


def _opt(cfg: dict, arch: str) -> ArchSpec:
    if not cfg.get("do_layer_norm_before", True):
        raise UnsupportedModelError(f"{arch}: do_layer_norm_before=false (post-LN OPT-350m) is not supported")
    if cfg.get("word_embed_proj_dim", cfg["hidden_size"]) != cfg["hidden_size"]:
        raise UnsupportedModelError(f"{arch}: word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if cfg.get("activation_function", "relu") != "relu":
        raise UnsupportedModelError(f"{arch}: activation_function={cfg['activation_function']!r} (only relu)")
    if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
        raise UnsupportedModelError(f"{arch}: enable_bias=false / non-affine layer norm is not supported")
    heads = cfg["num_attention_heads"]
    return ArchSpec(
        family="opt", hf_architecture=arch,
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_dim"],
        num_attention_heads=heads, num_query_groups=heads, head_dim=cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["max_position_embeddings"],
        normalization="LayerNorm", norm_eps=1e-5, gated_mlp=False, activation="relu",
        linear_bias=True, qkv_bias=True, position_embedding="learned_absolute", position_offset=2,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)), hf_config=cfg)
