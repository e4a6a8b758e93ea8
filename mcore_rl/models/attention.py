"""Core attention through torch kernels for the local (non-TE) spec, padded or packed.

megatron-core's local `DotProductAttention` materialises the full [b*heads, s, s] score
matrix with an fp32 softmax: at 4k tokens it is the memory and speed limit (measured in
benchmarks/gpu/RESULTS.md). SDPA dispatches to flash / memory-efficient kernels on GPU and a
fused kernel on CPU. `SDPAttention` plugs into the spec's `core_attention` slot with the same
constructor and forward signature.

Padded input ([s, b, heads, d]): causal masking only; right-padded batches need no mask
because valid tokens never attend to the padding that follows them.

Packed input (THD, `packed_seq_params` with `cu_seqlens`; megatron hands q/k/v as
[t, heads, d]): causal within each sequence, nothing across. Kernels, by preference
(`MCORE_RL_PACKED_ATTENTION=varlen|flex|sdpa` picks one):
- varlen: torch's variable-length flash-attention (`torch.nn.attention.varlen`), CUDA, bf16/fp16;
- flex: FlexAttention with a document-causal block mask, compiled (CUDA);
- sdpa: one SDPA call per sequence; the CPU path, and the exact twin of the padded path.

RoPE on packed input: megatron-core applies it sequence by sequence (a few small kernels per
sequence, per layer, for q and k, after a host sync on `cu_seqlens`), which on a GPU costs
about as much as the layer's matmuls when micro-batches hold dozens of sequences.
`install_packed_rope` routes that case to one gather of the frequency table at each token's
position in its sequence and one rotary kernel over the whole row: the same numbers.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

PACKED_KERNELS = ("auto", "varlen", "flex", "sdpa")


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise NotImplementedError("SDPAttention does not support context parallelism")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None -> 1/sqrt(head_dim), as in HF models

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise NotImplementedError(f"SDPAttention takes packed sequences in THD format, "
                                          f"not {packed_seq_params.qkv_format!r}")
            return packed_attention(query, key, value, packed_seq_params, self.softmax_scale, dropout)
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=dropout,
                                             enable_gqa=q.size(1) != k.size(1))
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


# ------------------------------------------------------------------ packed (THD) kernels
def packed_attention(q, k, v, params, scale=None, dropout: float = 0.0, kernel: str | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence: q [t, hq, d], k/v [t, hkv, d] -> [t, hq * d]."""
    kernel = kernel or packed_kernel(q, dropout)
    if kernel == "sdpa":
        out = _per_sequence(q, k, v, params, scale, dropout)
    else:
        try:
            out = (_varlen if kernel == "varlen" else _flex)(q, k, v, params, scale)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a torch build whose kernel does not run here: say so once, use the next one
            if kernel in _BROKEN or os.environ.get("MCORE_RL_PACKED_ATTENTION", "auto") != "auto":
                raise
            _BROKEN[kernel] = f"{type(e).__name__}: {str(e)[:200]}"
            warnings.warn(f"packed attention: the {kernel} kernel failed ({_BROKEN[kernel]}); using another")
            return packed_attention(q, k, v, params, scale, dropout)
    return out.reshape(q.size(0), -1)


_BROKEN: dict[str, str] = {}


def packed_kernel(q: torch.Tensor, dropout: float = 0.0) -> str:
    """The kernel for this input: the env's choice, else the fastest one that runs here."""
    want = os.environ.get("MCORE_RL_PACKED_ATTENTION", "auto").strip().lower()
    if want not in PACKED_KERNELS:
        raise ValueError(f"MCORE_RL_PACKED_ATTENTION={want!r}: must be one of {', '.join(PACKED_KERNELS)}")
    if want != "auto":
        return want
    if not q.is_cuda or dropout > 0:
        return "sdpa"
    if q.dtype in (torch.bfloat16, torch.float16) and "varlen" not in _BROKEN and _varlen_fn() is not None:
        return "varlen"
    return "flex" if "flex" not in _BROKEN and _flex_fn() is not None else "sdpa"


def _bounds(params) -> list[int]:
    b = getattr(params, "mcore_rl_bounds", None)
    return b if b is not None else params.cu_seqlens_q.tolist()


def _per_sequence(q, k, v, params, scale, dropout):
    b = _bounds(params)
    gqa = q.size(1) != k.size(1)
    outs = []
    for s, e in zip(b[:-1], b[1:]):
        qi, ki, vi = (t[s:e].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, len, d]
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


_VARLEN: list = []


def _varlen_fn():
    """torch's varlen flash attention and how to ask it for causal masking / GQA (its signature
    changed between torch releases), or None where torch has none."""
    if not _VARLEN:
        try:
            from torch.nn.attention.varlen import varlen_attn

            params = inspect.signature(varlen_attn).parameters  # 2.10: is_causal; 2.11: window_size, scale; 2.12: enable_gqa
            _VARLEN.append((varlen_attn, "window_size" in params, "enable_gqa" in params, "scale" in params))
        except Exception:
            _VARLEN.append(None)
    return _VARLEN[0]


def _varlen(q, k, v, params, scale):
    fn, windowed, has_gqa, has_scale = _varlen_fn()
    kw = {"window_size": (-1, 0)} if windowed else {"is_causal": True}
    if scale is not None:  # None: the kernel's default, 1/sqrt(head size), as SDPA's
        if not has_scale:
            raise NotImplementedError("this torch's varlen_attn takes no softmax scale")
        kw["scale"] = scale
    if q.size(1) != k.size(1):
        if has_gqa:
            kw["enable_gqa"] = True
        else:  # no GQA switch in this torch: repeat the KV heads
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu = params.cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    return fn(q, k, v, cu, cu, params.max_seqlen_q, params.max_seqlen_kv, **kw)


_FLEX: dict = {}


def _flex_fn():
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            _FLEX["fn"] = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention
        except Exception as e:  # pragma: no cover - torch without FlexAttention
            warnings.warn(f"FlexAttention unavailable: {e}")
            _FLEX["fn"] = None
    return _FLEX["fn"]


def _document_mask(params, t: int, device):
    """The block mask of causal attention within each sequence, built once per micro-batch (every
    layer reuses it)."""
    cached = getattr(params, "mcore_rl_block_mask", None)
    if cached is not None:
        return cached
    from torch.nn.attention.flex_attention import create_block_mask

    b = _bounds(params)
    doc = torch.repeat_interleave(torch.arange(len(b) - 1, device=device),
                                  torch.tensor([e - s for s, e in zip(b[:-1], b[1:])], device=device))

    def causal_within(bi, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    # compiled on CUDA: the eager builder materialises t x t entries (GBs at 16k tokens)
    mask = create_block_mask(causal_within, None, None, t, t, device=device, _compile=device.type == "cuda")
    params.mcore_rl_block_mask = mask
    return mask


def _flex(q, k, v, params, scale):
    mask = _document_mask(params, q.size(0), q.device)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, t, d]
    out = _flex_fn()(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return out[0].transpose(0, 1)


# ------------------------------------------------------------------ RoPE on packed rows
def packed_positions(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """Each token's position within its sequence, [t] long, computed on cu_seqlens' device (no sync)."""
    cu = cu_seqlens.to(torch.long)
    idx = torch.arange(t, device=cu.device)
    return idx - cu[torch.searchsorted(cu[1:], idx, right=True)]


def install_packed_rope() -> None:
    """Route megatron-core's THD RoPE (`apply_rotary_pos_emb` with `cu_seqlens`, as its attention
    calls it) to one rotary kernel over the packed row; every other case goes to megatron's own."""
    import megatron.core.transformer.attention as mattn
    from megatron.core.models.common.embeddings import rope_utils

    if getattr(mattn.apply_rotary_pos_emb, "mcore_rl_packed", False):
        return
    original = rope_utils.apply_rotary_pos_emb

    def apply_rotary_pos_emb(t, freqs, config, cu_seqlens=None, mscale=1.0, cp_group=None, **kwargs):
        flat = (cu_seqlens is not None and not kwargs and not config.apply_rope_fusion
                and not config.multi_latent_attention and (cp_group is None or cp_group.size() == 1)
                and not (cu_seqlens.numel() > 2 and freqs.size(0) == t.size(0)))  # not the exact-offset table
        if not flat:
            return original(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group, **kwargs)
        per_token = freqs[packed_positions(cu_seqlens, t.size(0)).to(freqs.device)]  # [t, 1, 1, d]
        return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), per_token, rotary_interleaved=config.rotary_interleaved,
                                                     mscale=mscale).squeeze(1)

    apply_rotary_pos_emb.mcore_rl_packed = True
    mattn.apply_rotary_pos_emb = apply_rotary_pos_emb
