"""Packed micro-batches: no compute on padding.

The shard keeps its right-padded `[N, L]` layout (batch.py); what goes through a model is
different. With `actor.use_dynamic_bsz` the rows of a pass are grouped into micro-batches of
at most a token budget (`*_max_token_len_per_gpu`) of *real* tokens (first-fit decreasing on
the lengths), and each micro-batch is one packed row (megatron's THD format): the sequences
concatenated, position ids restarting at each, `cu_seqlens` marking where each starts, so
attention is causal within a sequence and never across (attention.py). A model's output on
the packed row is read back per sequence with `per_sequence` as `[n, W]` (W: the longest
sequence of the micro-batch minus one), in the shard's shifted token space, so the losses and
their masks are those of the padded path; only the sums they are made of change order.

Across DP ranks, the prompts of each mini-batch are dealt so that every rank gets as many and
about the same number of tokens (`balance_order`): the gradient all-reduce at the end of each
mini-batch waits for the slowest rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Per-token fields of a Shard (shifted space, [N, L-1]) a micro-batch can carry.
TOKEN_KEYS = ("old_logp", "ref_logp", "old_values", "advantages", "returns", "rollout_logprobs", "mask")


def sequence_lengths(shard) -> torch.Tensor:
    """Real tokens of each row: prompt + response."""
    return shard.prompt_length + shard.response_length


def token_budget_bins(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped so that each group sums to at most `budget` (first-fit
    decreasing: within 11/9 of the fewest groups). Each group is in ascending index order."""
    lengths = [int(x) for x in lengths]
    if lengths and max(lengths) > budget:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the token budget of {budget} "
                         f"(raise *_max_token_len_per_gpu to at least max_prompt_length + max_response_length)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def balance_order(order: Sequence[int], tokens: Sequence[float], mini: int, dp: int) -> list[int]:
    """`order` with each mini-batch's prompts rearranged so that the `dp` contiguous blocks the
    layout hands to the DP ranks (`Layout.train_shard`) hold as many prompts each and about the
    same tokens. `tokens[p]`: the tokens of prompt p's samples. Greedy: largest prompt first,
    to the lightest rank that still has room. The mini-batches keep their prompts."""
    order = list(order)
    if dp == 1:
        return order
    out = []
    for i in range(0, len(order), mini):
        chunk = order[i:i + mini]
        at = {p: j for j, p in enumerate(chunk)}
        per = len(chunk) // dp
        ranks: list[list[int]] = [[] for _ in range(dp)]
        load = [0.0] * dp
        for p in sorted(chunk, key=lambda p: (-float(tokens[p]), at[p])):
            d = min((d for d in range(dp) if len(ranks[d]) < per), key=lambda d: (load[d], d))
            ranks[d].append(p)
            load[d] += float(tokens[p])
        out += [p for r in ranks for p in sorted(r, key=at.get)]
    return out


def dp_imbalance(order: Sequence[int], tokens: Sequence[float], mini: int, dp: int) -> float:
    """Time lost to uneven DP shards: sum over mini-batches of the busiest rank's tokens over
    the sum of the mean rank's (1.0 = perfect; each mini-batch ends in a gradient all-reduce)."""
    busiest = mean = 0.0
    for i in range(0, len(order), mini):
        chunk = order[i:i + mini]
        per = len(chunk) // dp
        loads = [sum(float(tokens[p]) for p in chunk[d * per:(d + 1) * per]) for d in range(dp)]
        busiest += max(loads)
        mean += sum(loads) / dp
    return busiest / mean if mean > 0 else 1.0


def pack_rows(shard, rows: Sequence[int], keys: Sequence[str], device, position_offset: int = 0,
              cols: dict | None = None) -> dict:
    """One packed micro-batch of `rows`: `input_ids` / `position_ids` [1, T] (T = their real
    tokens), `packed_seq_params` (THD), the per-token `keys` as [n, W] and `unpack_index` [n, W]
    (where position t of row i sits in the packed shifted space: cu_seqlens[i] + t). `cols`: columns
    (or a loss mask) that replace the shard's own."""
    from megatron.core.packed_seq_params import PackedSeqParams

    rows = torch.as_tensor(list(rows), dtype=torch.long)
    lens = sequence_lengths(shard)[rows]
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    total, longest = int(cu[-1]), int(lens.max())
    ids = torch.cat([shard.input_ids[r, :n] for r, n in zip(rows.tolist(), lens.tolist())])
    pos = torch.cat([torch.arange(n) for n in lens.tolist()]) + position_offset
    width = longest - 1
    index = (cu[:-1, None].long() + torch.arange(width)[None]).clamp(0, max(total - 2, 0))
    dev_cu = cu.to(device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=dev_cu, cu_seqlens_kv=dev_cu,
                             cu_seqlens_q_padded=dev_cu, cu_seqlens_kv_padded=dev_cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    params.mcore_rl_bounds = cu.tolist()  # host copy for the attention's per-sequence paths (no device sync)
    mb = {"input_ids": ids[None].to(device), "position_ids": pos[None].to(device), "packed_seq_params": params,
          "unpack_index": index.to(device), "rows": rows}
    for k in keys:
        if k == "input_ids":
            continue
        col = cols[k] if cols and k in cols else shard.mask if k == "mask" else getattr(shard, k)
        mb[k] = col[rows, :width].to(device)
    return mb


def packed_micro_batches(shard, rows: Sequence[int], budget: int, keys: Sequence[str], device,
                         position_offset: int = 0, cols: dict | None = None) -> list[dict]:
    """`rows` of the shard as packed micro-batches of at most `budget` real tokens each."""
    rows = list(rows)
    lens = sequence_lengths(shard)[torch.as_tensor(rows, dtype=torch.long)].tolist()
    return [pack_rows(shard, [rows[j] for j in b], keys, device, position_offset, cols)
            for b in token_budget_bins(lens, budget)]


def per_sequence(x: torch.Tensor, mb: dict) -> torch.Tensor:
    """A model output over the shifted positions of a micro-batch ([b, s-1]) as [n, W] rows in the
    shard's layout: unchanged for a padded micro-batch, gathered per sequence for a packed one.
    Positions past a sequence's end hold values of its neighbour: the mask excludes them."""
    if "unpack_index" not in mb:
        return x
    return x.reshape(-1)[mb["unpack_index"]]


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], n: int, width: int) -> torch.Tensor:
    """[n, width] from (rows, values [len(rows), w <= width]) pieces; zeros where nothing was written."""
    out = torch.zeros(n, width, dtype=parts[0][1].dtype if parts else torch.float32)
    for rows, vals in parts:
        out[rows, :vals.shape[1]] = vals.to(out.dtype)
    return out
