"""Actor weights, Megatron layout -> rollout engine.

Two paths, chosen per engine by `Resharder.sync`:

* fast (`fast_path.FastSync`): when this rank's training shard and its rollout shard line up
  (CUDA, an in-process vLLM engine with unquantised weights updated in place, same TP size
  and rank, PP=1), a precomputed plan copies the Megatron shard straight into vLLM's fused
  parameters; bit-identical to the HF-named path, ~1.4x the copy floor at 1.5B.
* HF-named (`gather.iter_hf_tensors` -> ``engine.load_weights``): the general case, in
  bounded buckets. Used wherever the fast path does not apply (CPU, the transformers engine,
  PP > 1, different training and rollout TP, ...), with a one-line reason printed once.
"""

from __future__ import annotations

import time

import torch

from converters.gather import build_plan, iter_hf_tensors

FAST_PATH_MODES = ("auto", "off")


def _say(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _agree(reason: str | None) -> str | None:
    """Every rank takes the same path: the fast path only where it applies on all ranks.

    The HF-named path runs TP all-gathers and PP broadcasts, the fast path none; one rank on
    each would leave the other waiting in a collective forever. The plan can apply on one TP
    rank and not another (e.g. vLLM's vocab shard lines up with Megatron's on rank 0 only).
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    for rank, why in enumerate(reasons):
        if why is not None:
            return why if rank == dist.get_rank() else f"not applicable on rank {rank}: {why}"
    return None


class Resharder:
    """Pushes the actor's weights into a rollout engine before each rollout phase.

    `fast_path`: ``"auto"`` uses `fast_path.FastSync` where it applies (decided once per
    engine; see `why_not_fast`), else the HF-named path; ``"off"`` always the HF-named path.

    HF-named path: the tensors stream out of `iter_hf_tensors` (one Megatron parameter at a
    time) and are grouped into buckets of at most `bucket_mb` before being handed to the
    engine, so extra memory during a sync is bounded by the bucket plus the largest tensor.
    """

    def __init__(self, model, bucket_mb: int = 512, fast_path: str = "auto"):
        inner = model.module if hasattr(model, "module") else model
        self.model, self.bucket_bytes = model, bucket_mb * 2**20
        self.plan = build_plan(inner)  # names, shapes, owners: computed once
        self.fast_reason: str | None = None  # why the last engine does not take the fast path
        self.set_fast_path(fast_path)

    def set_fast_path(self, mode: str) -> None:
        """``"auto"`` or ``"off"`` (config: actor_rollout_ref.rollout.sync_fast_path)."""
        if mode not in FAST_PATH_MODES:
            raise ValueError(f"sync_fast_path must be one of {FAST_PATH_MODES}, got {mode!r}")
        self.fast_path = mode
        self._fast = self._fast_engine = None  # decided again at the next sync

    def why_not_fast(self, engine) -> str | None:
        """None when the fast path applies to `engine` (building its plan), else the reason."""
        if self.fast_path == "off":
            return "actor_rollout_ref.rollout.sync_fast_path=off"
        if engine is self._fast_engine:
            return None if self._fast is not None else self.fast_reason
        self._fast, self._fast_engine = None, engine
        self.fast_reason = self._fast_reason(engine)
        if self.fast_reason is None:
            from mcore_rl.resharding.fast_path import FastSync, NotApplicable

            try:
                self._fast = FastSync(self.model, engine)
            except NotApplicable as e:
                self.fast_reason = str(e)
            except (AttributeError, KeyError, TypeError) as e:  # a vLLM layout the plan does not know
                self.fast_reason = f"fast-path plan failed: {type(e).__name__}: {e}"
        self.fast_reason = _agree(self.fast_reason)
        if self.fast_reason is not None:
            self._fast = None
        if self.fast_reason is None:
            _say(f"mcore_rl: weight sync: fast path ({len(self._fast.plan.copies)} copies, "
                 f"{len(self._fast.plan.gathers)} QKV gathers, plan built in {self._fast.plan_seconds * 1e3:.0f} ms)")
        else:
            _say(f"mcore_rl: weight sync: HF-named path ({self.fast_reason})")
        return self.fast_reason

    @staticmethod
    def _fast_reason(engine) -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA: vLLM on CPU repacks its linear weights"
        from mcore_rl.rollout.vllm_engine import VLLMEngine

        if not isinstance(engine, VLLMEngine):
            return f"the {type(engine).__name__} rollout engine has no vLLM parameters to copy into"
        if engine.on_cpu:
            return "vLLM runs on CPU (repacked linear weights)"
        if engine.reload_mode != "direct":
            return f"engine reload_mode={engine.reload_mode!r} (weights are post-processed after loading)"
        return None

    def _buckets(self, stats: dict):
        bucket, size = [], 0
        for name, t in iter_hf_tensors(self.model, plan=self.plan):
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                yield from bucket
                bucket, size = [], 0
            bucket.append((name, t))
            size += nbytes
            stats["bytes"] += nbytes
            stats["tensors"] += 1
        yield from bucket

    @torch.no_grad()
    def sync(self, engine) -> dict[str, float]:
        """Load the current actor weights into `engine` by the fast path where it applies, else
        the HF-named path; returns seconds, bytes, tensors, GB/s and ``sync/fast`` (1 or 0)."""
        if self.why_not_fast(engine) is None:
            return {**self._fast.sync(), "sync/fast": 1.0}
        return self.sync_hf(engine)

    @torch.no_grad()
    def sync_hf(self, engine) -> dict[str, float]:
        """The HF-named path, always (the general case, and the fast path's oracle)."""
        stats = {"bytes": 0, "tensors": 0}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.load_weights(self._buckets(stats))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"sync/seconds": dt, "sync/bytes": stats["bytes"], "sync/tensors": stats["tensors"],
                "sync/GBps": stats["bytes"] / dt / 1e9 if dt > 0 else 0.0, "sync/fast": 0.0}
