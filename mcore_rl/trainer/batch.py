"""The rollout batch: samples -> fixed-shape, right-padded tensors the models train on.

Layout. `input_ids[i]` is prompt + response, right-padded to `prompt_len + response_len`
(fixed, so every micro-batch has the same shape, which pipeline parallelism needs). All
per-token quantities (log-probs, values, advantages, `mask`) live in the *shifted* space
of length L-1: position t scores token t+1 given tokens 0..t. `mask[i, t]` is 1 exactly
where token t+1 is a response token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_index: int        # global index of the prompt in this step's batch
    sample_index: int        # which of the n samples of that prompt
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    score: float = 0.0
    reward_error: str | None = None


def pad_batch(samples: list[Sample], prompt_len: int, response_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    n, L = len(samples), prompt_len + response_len
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    mask = torch.zeros((n, L - 1), dtype=torch.bool)
    rollout_lp = torch.zeros((n, L - 1), dtype=torch.float32)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        if p > prompt_len or r > response_len:
            raise ValueError(f"sample {i}: prompt {p} / response {r} tokens exceed {prompt_len} / {response_len}")
        ids[i, :p] = torch.tensor(s.prompt_ids)
        if r:
            ids[i, p:p + r] = torch.tensor(s.response_ids)
            mask[i, p - 1:p - 1 + r] = True
            if s.rollout_logprobs:
                rollout_lp[i, p - 1:p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    return {
        "input_ids": ids,
        "mask": mask,
        "rollout_logprobs": rollout_lp,
        "scores": torch.tensor([s.score for s in samples], dtype=torch.float32),
        "group_index": torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
        "response_length": torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32),
    }


def last_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome rewards as token rewards: each sample's score on its last response token."""
    rewards = torch.zeros(mask.shape, dtype=torch.float32)
    has = mask.any(dim=1)
    last = mask.shape[1] - 1 - mask.flip(1).float().argmax(dim=1)
    rewards[has.nonzero().squeeze(1), last[has]] = scores[has]
    return rewards
