"""Actor weights, Megatron layout -> rollout engine, in bounded buckets (see `gather`)."""

from __future__ import annotations

import time

import torch

from mcore_rl.resharding.gather import build_plan, iter_hf_tensors


class Resharder:
    """Pushes the actor's weights into a rollout engine before each rollout phase.

    The tensors stream out of `iter_hf_tensors` (one Megatron parameter at a time) and are
    grouped into buckets of at most `bucket_mb` before being handed to the engine, so extra
    memory during a sync is bounded by the bucket plus the largest tensor.
    """

    def __init__(self, model, bucket_mb: int = 512):
        inner = model.module if hasattr(model, "module") else model
        self.model, self.bucket_bytes = model, bucket_mb * 2**20
        self.plan = build_plan(inner)  # names, shapes, owners: computed once

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
        """Load the current actor weights into `engine`; returns seconds, bytes and GB/s."""
        stats = {"bytes": 0, "tensors": 0}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.load_weights(self._buckets(stats))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"sync/seconds": dt, "sync/bytes": stats["bytes"], "sync/tensors": stats["tensors"],
                "sync/GBps": stats["bytes"] / dt / 1e9 if dt > 0 else 0.0}
