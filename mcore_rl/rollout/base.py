"""Rollout engine interface: token ids in, sampled token ids + log-probs out.

Conventions shared by every engine, so that callers (and tests) can swap them:

* Prompts and completions are token ids; no text, no tokenizer.
* Stopping: a sample ends at the first token in ``eos ∪ stop_token_ids`` (the stop token is
  kept in ``token_ids``; ``finish_reason="stop"``) or after ``max_tokens`` tokens, or when the
  context (``max_model_len``) is full (``finish_reason="length"``). ``eos`` is every
  ``eos_token_id`` found in the checkpoint's ``config.json`` and ``generation_config.json``;
  ``Sampling.ignore_eos`` drops it (explicit ``stop_token_ids`` still apply).
* Log-probs (``logprobs_mode="raw"``, the default): for each sampled token, its log-prob under
  the model's *unmodified* next-token distribution, ``log_softmax(logits)[token]`` at temperature
  1, before temperature, top-k, top-p or penalties. This is what the trainer recomputes
  (old/reference log-probs) from the same weights, so the two differ only by numerics, and it
  is what vLLM returns by default (``logprobs_mode="raw_logprobs"``, the same in vLLM 0.26 and
  0.32). With temperature 1 and no top-k/top-p it is also the behaviour policy's log-prob.
  ``logprobs_mode="processed"`` gives the log-prob under the distribution actually sampled from
  (after temperature and top-k/top-p), for off-policy corrections that need it.
* Seeds: ``Sampling.seed=None`` uses the engine's generator (seeded once, at construction).
  An explicit seed gives sample ``k`` of prompt ``i`` the seed ``seed + i * n + k`` (vLLM seeds
  the ``n`` samples of a request ``s, s+1, ...``), so no two samples of a call share a random
  stream; callers that shard prompts over data-parallel ranks should add
  ``n * (global index of their first prompt)`` to the seed.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]
LogprobsMode = Literal["raw", "processed"]


@dataclass
class Sampling:
    """Sampling parameters for one `generate` call (a subset of vLLM's, engine-neutral).

    ``temperature=0`` is greedy. ``top_k<=0`` and ``top_p=1`` disable those filters.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = True

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def request_seed(self, prompt_index: int) -> int | None:
        """Seed of the first sample of prompt `prompt_index` (see the module docstring)."""
        return None if self.seed is None else self.seed + prompt_index * self.n


@dataclass
class RolloutOutput:
    """One sample: the completion of prompt `prompt_index` (its `sample_index`-th of `n`).

    `logprobs[t]` belongs to `token_ids[t]` (see the module docstring for which distribution);
    empty when log-probs were not requested.
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    sample_index: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)


class RolloutEngine(abc.ABC):
    """A generator of samples whose weights can be replaced in place.

    `generate` returns ``len(prompts) * sampling.n`` outputs, prompt-major: the samples of
    prompt 0, then those of prompt 1, ...
    """

    #: token ids that end a sample unless `Sampling.ignore_eos` (see `model_eos_token_ids`)
    eos_token_ids: frozenset[int] = frozenset()

    @abc.abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling | None = None
                 ) -> list[RolloutOutput]:
        ...

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights in place from ``(HF parameter name, full tensor)`` pairs.

        `weights` may be a generator (e.g. yielding buckets from a resharder): it is consumed
        once, in order, without being materialised. Pass every tensor of the model (a partial
        update of a layer is not supported by every engine).
        """

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory between rollouts (no-op where unsupported)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo `sleep`; `tags` (``"weights"``, ``"kv_cache"``) wake parts of it, None all."""

    def close(self) -> None:
        """Free the engine's memory; the object is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stop_set(self, sampling: Sampling) -> frozenset[int]:
        """Token ids that end a sample for `sampling`."""
        extra = frozenset(sampling.stop_token_ids or ())
        return extra if sampling.ignore_eos else extra | self.eos_token_ids


def model_eos_token_ids(model_path: str | os.PathLike) -> frozenset[int]:
    """Every `eos_token_id` of an HF checkpoint (config.json and generation_config.json).

    Read from the files, not from a tokenizer, so that engines agree on stopping without one.
    """
    ids: set[int] = set()
    for fname in ("config.json", "generation_config.json"):
        path = os.path.join(str(model_path), fname)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            cfg = json.load(f)
        for c in (cfg, cfg.get("text_config") or {}):
            eos = c.get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
    return frozenset(ids)


def truncate_at_stop(token_ids: Sequence[int], stop: frozenset[int], max_tokens: int
                     ) -> tuple[int, FinishReason]:
    """Length to keep and finish reason of a raw continuation under the stop convention."""
    for i, t in enumerate(token_ids[:max_tokens]):
        if t in stop:
            return i + 1, "stop"
    return min(len(token_ids), max_tokens), "length"
