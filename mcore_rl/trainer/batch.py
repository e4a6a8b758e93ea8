"""The rollout batch as this rank holds it: samples -> fixed-shape, right-padded tensors.

A rank never holds the step's whole batch: it holds the samples its rollout engine generated
(`pad_batch`), then its training shard (`Shard.select` / `Shard.cat`, samples received from
peers come through `to_bytes` / `from_bytes`). The n samples of a prompt stay together.

Layout. `input_ids[i]` is prompt + response, right-padded to `prompt_len + response_len`
(fixed: rows travel between ranks without sizes; the models never compute on the padding when
micro-batches are packed, packing.py). All
per-token quantities (log-probs, values, advantages, `mask`) live in the *shifted* space
of length L-1: position t scores token t+1 given tokens 0..t. `mask[i, t]` is 1 exactly
where token t+1 is a response token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Sample:
    prompt_index: int        # index of the prompt in this step's batch
    sample_index: int        # which of the n samples of that prompt
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    score: float = 0.0
    reward_error: str | None = None


@dataclass
class Shard:
    """Samples as rows of tensors. The rollout fields travel between ranks; the model outputs
    (`old_logp` ...) and `advantages` / `returns` are filled in on the rank that trains."""

    prompt_index: torch.Tensor      # [N] long: index of the prompt in the step's batch (the group id)
    sample_index: torch.Tensor      # [N] long
    input_ids: torch.Tensor         # [N, L] long
    prompt_length: torch.Tensor     # [N] long
    response_length: torch.Tensor   # [N] long
    truncated: torch.Tensor         # [N] bool: the response hit the length limit
    scores: torch.Tensor            # [N] float32 (outcome reward, after any shaping)
    rollout_logprobs: torch.Tensor  # [N, L-1] float32
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def mask(self) -> torch.Tensor:
        """[N, L-1] bool, true where token t+1 is a response token (derived, never sent)."""
        pos = torch.arange(self.input_ids.shape[1] - 1)
        start = (self.prompt_length - 1).unsqueeze(1)
        return (pos >= start) & (pos < start + self.response_length.unsqueeze(1))

    def select(self, rows: torch.Tensor | list[int]) -> Shard:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Shard(**{f.name: (None if (v := getattr(self, f.name)) is None else v[rows]) for f in fields(self)})

    def take_prompts(self, prompts: list[int]) -> Shard:
        """The rows of `prompts`, in that order, each prompt's samples by sample index."""
        at = {p: i for i, p in enumerate(prompts)}
        keyed = sorted((at[p], s, r) for r, (p, s) in enumerate(zip(self.prompt_index.tolist(),
                                                                     self.sample_index.tolist())) if p in at)
        return self.select([r for _, _, r in keyed])

    @staticmethod
    def cat(parts: list[Shard]) -> Shard:
        out = {}
        for f in fields(Shard):
            vals = [getattr(p, f.name) for p in parts]
            out[f.name] = None if any(v is None for v in vals) else torch.cat(vals)
        return Shard(**out)

    # --------------------------------------------------------------- transport
    # widest first, so that every field starts aligned to its element size in the buffer
    _WIRE = (("prompt_index", torch.int64), ("sample_index", torch.int64), ("input_ids", torch.int32),
             ("prompt_length", torch.int32), ("response_length", torch.int32), ("scores", torch.float32),
             ("rollout_logprobs", torch.float32), ("truncated", torch.bool))

    @staticmethod
    def wire_bytes(n: int, seq_len: int) -> int:
        """Bytes of `n` rows on the wire (token ids as int32: every vocabulary fits)."""
        per_row = {"input_ids": seq_len, "rollout_logprobs": seq_len - 1}
        return sum(n * per_row.get(name, 1) * torch.empty((), dtype=dt).element_size() for name, dt in Shard._WIRE)

    def to_bytes(self) -> torch.Tensor:
        """The rollout fields, flattened into one uint8 tensor (one message per peer)."""
        return torch.cat([getattr(self, name).to(dt).contiguous().view(-1).view(torch.uint8)
                          for name, dt in self._WIRE])

    @staticmethod
    def from_bytes(buf: torch.Tensor, n: int, seq_len: int) -> Shard:
        out, at = {}, 0
        shapes = {"input_ids": (n, seq_len), "rollout_logprobs": (n, seq_len - 1)}
        for name, dt in Shard._WIRE:
            shape = shapes.get(name, (n,))
            size = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            t = buf[at:at + size].view(dt).view(shape)
            at += size
            out[name] = t.to(torch.long, copy=True) if dt in (torch.int32, torch.int64) else t.clone()
        if at != buf.numel():
            raise ValueError(f"received {buf.numel()} bytes for {n} samples, expected {at}")
        return Shard(**out)


def pad_batch(samples: list[Sample], prompt_len: int, response_len: int, pad_id: int) -> Shard:
    n, L = len(samples), prompt_len + response_len
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    rollout_lp = torch.zeros((n, L - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p > prompt_len or r > response_len:
            raise ValueError(f"sample {i}: prompt {p} / response {r} tokens exceed {prompt_len} / {response_len}")
        ids[i, :p] = torch.tensor(s.prompt_ids)
        if r:
            ids[i, p:p + r] = torch.tensor(s.response_ids)
            if s.rollout_logprobs:
                rollout_lp[i, p - 1:p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    return Shard(
        prompt_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
        sample_index=torch.tensor([s.sample_index for s in samples], dtype=torch.long),
        input_ids=ids,
        prompt_length=torch.tensor([len(s.prompt_ids) for s in samples], dtype=torch.long),
        response_length=torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long),
        truncated=torch.tensor([s.finish_reason == "length" for s in samples], dtype=torch.bool),
        scores=torch.tensor([s.score for s in samples], dtype=torch.float32),
        rollout_logprobs=rollout_lp,
    )


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome rewards as token rewards: each sample's score on its last response token."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32)
    has = mask.any(dim=1)
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)
    rewards[has.nonzero().squeeze(1), last[has]] = scores[has]
    return rewards
