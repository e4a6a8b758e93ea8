"""Actor, reference and critic as megatron-core `GPTModel`s, built from an `ArchSpec`.

Each rank builds only its own TP shard of its own PP stage (call after
`init_distributed`). The local spec (torch ops, SDPA attention) is the default; the
TransformerEngine spec is used when asked for and importable. The critic is the same
network with the vocab projection replaced by a replicated hidden -> 1 value head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mcore_rl.models.arch import ArchSpec

ROLES = ("actor", "reference", "critic")


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False


def transformer_config(spec: ArchSpec, dtype: torch.dtype = torch.float32, **overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    spec.check_parallel(tp, pp)
    kw = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim, normalization=spec.normalization, layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=spec.gated_mlp, activation_func={"silu": F.silu, "relu": F.relu}[spec.activation],
        add_bias_linear=spec.linear_bias, add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0,
        # fused kernels are CUDA-only or need apex/TE; the unfused paths are exact
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        # interleaved PP over gloo with batched p2p receives activations swapped, silently (the loss is
        # off, nothing fails); only batch on NCCL
        batch_p2p_comm=torch.cuda.is_available(),
        init_method_std=0.02,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(spec: ArchSpec, transformer_impl: str = "local"):
    from megatron.core.models.gpt import gpt_layer_specs

    from mcore_rl.models.attention import install_packed_rope

    install_packed_rope()  # packed micro-batches: one RoPE kernel per row, not one per sequence
    if transformer_impl == "transformer_engine":
        if not te_available():
            raise RuntimeError("transformer_impl=transformer_engine but transformer_engine is not importable; "
                               "install the `te` extra or use transformer_impl=local")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
    if transformer_impl != "local":
        raise ValueError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")
    from mcore_rl.models.attention import SDPAttention

    ls = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm, normalization=spec.normalization)
    ls.submodules.self_attention.submodules.core_attention = SDPAttention
    return ls


class ValueHead(torch.nn.Linear):
    """hidden -> 1, replicated on every TP rank (a width-1 output cannot be split).

    Its input (the final norm's output) is replicated across TP, so every rank computes the
    same value and the same gradient for it: no TP communication is needed. Called with the
    output layer's signature and return convention. Zero-initialised: the initial values are
    0 whatever the layout (a random init would depend on how much of the RNG stream the rank
    consumed building its pipeline stage), and the weight still gets a gradient at step one.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__(hidden_size, 1, bias=True, dtype=dtype)
        torch.nn.init.zeros_(self.weight)
        torch.nn.init.zeros_(self.bias)

    def forward(self, x, weight=None, runtime_gather_output=None):
        return super().forward(x), None


def llama3_inv_freq(dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3 frequency scaling with the config's own constants (megatron hard-codes them)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / inv
    low_wl = original_max_position_embeddings / low_freq_factor
    high_wl = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return torch.where(medium, smoothed, scaled)


def build_model(spec: ArchSpec, role: str = "actor", dtype: torch.dtype = torch.float32,
                transformer_impl: str = "local", device: torch.device | None = None, **config_overrides):
    """This rank's shard of the `role` model (a `GPTModel`), on `device` (default: this rank's)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from mcore_rl.distributed import device as default_device

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    config = transformer_config(spec, dtype, **config_overrides)
    pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(spec, transformer_impl),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position_embeddings + spec.position_offset,
        pre_process=pre, post_process=post, parallel_output=True,
        share_embeddings_and_output_weights=spec.tied_embeddings and role != "critic",
        position_embedding_type="rope" if spec.position_embedding == "rope" else "learned_absolute",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
    )
    if spec.rope_scaling is not None and hasattr(model, "rotary_pos_emb"):
        model.rotary_pos_emb.inv_freq = llama3_inv_freq(spec.head_dim, spec.rope_theta, **spec.rope_scaling)
    if role == "critic" and post:
        model.output_layer = ValueHead(spec.hidden_size, dtype)
    model.to(device=device or default_device(), dtype=dtype)  # norms are built in fp32 whatever params_dtype
    if hasattr(model, "rotary_pos_emb"):
        model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq.to(device or default_device())
    if role == "reference":
        model.requires_grad_(False)
        model.eval()
    model.mcore_rl_spec = spec
    model.mcore_rl_role = role
    return model


def position_ids(spec: ArchSpec, batch: int, seq: int, device) -> torch.Tensor:
    """Positions of a right-padded batch (OPT's learned positions start at index 2)."""
    pos = torch.arange(spec.position_offset, seq + spec.position_offset, device=device)
    return pos.unsqueeze(0).expand(batch, seq)
