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
* Weight updates go through `RolloutEngine.update_weights`, the one place that orders them:
  wake the weights (if the engine sleeps) -> load -> wake the KV cache -> drop cached
  prefixes (KV computed with the old weights). `RolloutEngine.release` puts the engine to
  sleep after generating, where it sleeps at all (`sleep_enabled`).
"""

from __future__ import annotations

import abc
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
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


@dataclass
class CopySlot:
    """One engine parameter, with what a loader needs to write it by plain copies."""

    param: torch.Tensor  # this rank's shard, the very tensor the engine's kernels read
    tp_rank: int | None = None  # its tensor-parallel shard, where the engine states it
    tp_size: int | None = None
    part_sizes: tuple[int, ...] | None = None  # rows of each fused part (e.g. gate, up), where stated
    heads: tuple[int, int, int, int] | None = None  # fused QKV: (q heads, kv heads, head size, kv head replicas)
    vocab_rows: tuple[int, int] | None = None  # vocab-parallel: [start, end) of the real vocabulary rows held


@dataclass
class CopySlots:
    """An engine's parameters (by the engine's names) and how HF tensors map onto them."""

    slots: dict[str, CopySlot]
    fused: dict[str, tuple[str, int]] = field(default_factory=dict)  # HF module -> (engine module, part)

    def locate(self, hf_name: str) -> tuple[str, int | None]:
        """The engine parameter an HF tensor goes into, and its part there (None: not fused)."""
        parts = hf_name.split(".")
        for i, p in enumerate(parts):
            if p in self.fused:
                module, part = self.fused[p]
                return ".".join(parts[:i] + [module] + parts[i + 1:]), part
        return hf_name, None


@dataclass(frozen=True)
class WeightTarget:
    """What an engine accepts new weights as, handed to the loader by `update_weights`.

    `load_hf`: ``(HF name, full tensor)`` pairs, every engine (see `RolloutEngine.load_weights`).
    `copy_slots`: the engine's parameters, written in place by plain copies; None where that
    would not reach the kernels, with the reason in `why_not_copy`. `load_adapter`: where the
    engine serves a LoRA adapter over fixed base weights, a folder in peft's format to serve from
    now on. An engine hands out the same target every time, so that loaders can keep per-target plans.
    """

    load_hf: Callable[[Iterable[tuple[str, torch.Tensor]]], None]
    copy_slots: Callable[[], CopySlots] | None = None
    why_not_copy: str | None = None
    load_adapter: Callable[[str], None] | None = None


class RolloutEngine(abc.ABC):
    """A generator of samples whose weights can be replaced in place.

    `generate` returns ``len(prompts) * sampling.n`` outputs, prompt-major: the samples of
    prompt 0, then those of prompt 1, ...
    """

    #: token ids that end a sample unless `Sampling.ignore_eos` (see `model_eos_token_ids`)
    eos_token_ids: frozenset[int] = frozenset()
    #: whether `release` frees accelerator memory (decided when the engine is built)
    sleep_enabled: bool = False
    #: whether the engine serves a LoRA adapter over base weights that updates keep
    serves_lora: bool = False

    @abc.abstractmethod
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: Sampling | None = None
                 ) -> list[RolloutOutput]:
        ...

    @abc.abstractmethod
    def weight_target(self) -> WeightTarget:
        """What this engine accepts new weights as (the same object every call)."""

    def update_weights(self, load: Callable[[WeightTarget], dict | None]) -> dict[str, float]:
        """Replace the weights: ``load(self.weight_target())`` inside the engine's protocol.

        Wake the weights (if the engine sleeps) -> `load` -> wake the KV cache -> reset the
        prefix cache. Waking the weights first and the KV cache after the load keeps peak
        memory lowest. Returns `load`'s stats plus ``timing/sync`` (load and prefix reset),
        ``sync/prefix_reset_s`` and, where the engine sleeps, ``timing/wake``.
        """
        stats: dict[str, float] = {}
        if self.sleep_enabled:
            t = time.perf_counter()
            self.wake_up(tags=["weights"])
            stats["timing/wake"] = time.perf_counter() - t
        t = time.perf_counter()
        stats.update(load(self.weight_target()) or {})
        load_s = time.perf_counter() - t
        if self.sleep_enabled:
            t = time.perf_counter()
            self.wake_up(tags=["kv_cache"])
            stats["timing/wake"] += time.perf_counter() - t
        t = time.perf_counter()
        self.reset_prefix_cache()
        stats["sync/prefix_reset_s"] = time.perf_counter() - t
        stats["timing/sync"] = load_s + stats["sync/prefix_reset_s"]
        return stats

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the weights from ``(HF parameter name, full tensor)`` pairs (`update_weights`).

        `weights` may be a generator (e.g. yielding buckets from a resharder): it is consumed
        once, in order, without being materialised. Pass every tensor of the model (a partial
        update of a layer is not supported by every engine).
        """
        self.update_weights(lambda target: target.load_hf(weights))

    def release(self) -> dict[str, float]:
        """Done generating until the next `update_weights`: where the engine sleeps, drop its
        weights and KV cache (level 2: the next update rewrites every weight; level 1 where the
        engine serves a LoRA adapter: the base weights wait in host memory). Returns
        ``timing/sleep`` when it slept."""
        if not self.sleep_enabled:
            return {}
        t = time.perf_counter()
        self.sleep(level=1 if self.serves_lora else 2)
        return {"timing/sleep": time.perf_counter() - t}

    def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (computed with other weights); no-op without a prefix cache."""

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
