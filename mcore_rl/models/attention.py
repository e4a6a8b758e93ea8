"""Core attention through `F.scaled_dot_product_attention` for the local (non-TE) spec.

megatron-core's local `DotProductAttention` materialises the full [b*heads, s, s] score
matrix with an fp32 softmax: at 4k tokens it is the memory and speed limit (FIELD_NOTES:
13.6% MFU, OOM at 4x4096). SDPA dispatches to flash / memory-efficient kernels on GPU and
a fused kernel on CPU. It plugs into the spec's `core_attention` slot with the same
constructor and forward signature. Causal masking only: right-padded batches need no mask
because valid tokens never attend to the padding that follows them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


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
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not take packed sequences")
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.size(1) != k.size(1))
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
