"""Actor weights, Megatron layout -> rollout engine.

The engine orders an update (`RolloutEngine.update_weights`: wake, load, wake, reset); the
resharder is its loader (`Resharder.load`), by one of two paths:

* fast (`fast_path.FastSync`): when the engine accepts plain copies into its parameters
  (`WeightTarget.copy_slots`: an in-process vLLM engine on GPU with unquantised weights
  updated in place) and this rank's training shard lines up with its rollout shard (same TP
  size and rank, PP=1), a precomputed copy program copies the Megatron shard straight into vLLM's
  fused parameters; bit-identical to the HF-named path, close to the copy floor.
* HF-named (`converters.gather.iter_hf_tensors` -> `WeightTarget.load_hf`): the general
  case, in bounded buckets. Used wherever the fast path does not apply (CPU, the
  transformers engine, PP > 1, different training and rollout TP, ...), with a one-line
  reason printed once. A LoRA actor's weights go merged (``W + alpha / r * B @ A``).
* adapter (``lora_sync="adapter"``, a LoRA actor and an engine that serves adapters,
  `WeightTarget.load_adapter`): the adapters alone, gathered whole
  (`converters.gather.iter_lora_tensors`), written in peft's format to a folder of this rank
  (in /dev/shm where there is one) and loaded by the engine; its base weights never change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from converters.gather import global_params, iter_hf_tensors, iter_lora_tensors

FAST_PATH_MODES = ("auto", "off")
LORA_SYNC_MODES = ("merged", "adapter")


_ADAPTER_PREFIX = "mcore_rl_adapter_"


def adapter_root(parent: str | None = None) -> tempfile.TemporaryDirectory:
    """This process's folder for adapter hand-overs (in /dev/shm where there is one), named by its
    pid. Folders of processes that are gone (killed before they could remove theirs) are removed
    first: /dev/shm is memory."""
    parent = parent or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    for name in os.listdir(parent):
        pid = name.removeprefix(_ADAPTER_PREFIX).split("_")[0]
        if name.startswith(_ADAPTER_PREFIX) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{_ADAPTER_PREFIX}{os.getpid()}_", dir=parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _say(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _agree(reason: str | None) -> str | None:
    """Every rank takes the same path: the fast path only where it applies on all ranks.

    The HF-named path runs TP all-gathers and PP broadcasts, the fast path none; one rank on
    each would leave the other waiting in a collective forever. The program can apply on one TP
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
    """Loads the actor's weights into a rollout engine before each rollout phase.

    `fast_path`: ``"auto"`` uses `fast_path.FastSync` where it applies (decided once per
    engine; see `why_not_fast`), else the HF-named path; ``"off"`` always the HF-named path.

    HF-named path: the tensors stream out of `iter_hf_tensors` (one Megatron parameter at a
    time) and are grouped into buckets of at most `bucket_mb` before being handed to the
    engine, so extra memory during a sync is bounded by the bucket plus the largest tensor.
    """

    def __init__(self, model, bucket_mb: int = 512, fast_path: str = "auto", lora_sync: str = "merged",
                 base_model: str = ""):
        from mcore_rl.models.lora import lora_of

        inner = model.module if hasattr(model, "module") else model
        self.model, self.bucket_bytes = model, bucket_mb * 2**20
        self.params = global_params(inner)  # names, shapes, owners: computed once
        self.fast_reason: str | None = None  # why the last engine does not take the fast path
        self.set_fast_path(fast_path)
        if lora_sync not in LORA_SYNC_MODES:
            raise ValueError(f"lora_sync must be one of {LORA_SYNC_MODES}, got {lora_sync!r}")
        self.lora = lora_of(inner) if lora_sync == "adapter" else None
        if lora_sync == "adapter" and self.lora is None:
            raise ValueError("lora_sync='adapter' needs a model with LoRA adapters")
        self.base_model, self._adapter_root, self._adapters = base_model, None, 0

    def set_fast_path(self, mode: str) -> None:
        """``"auto"`` or ``"off"`` (config: actor_rollout_ref.rollout.sync_fast_path)."""
        if mode not in FAST_PATH_MODES:
            raise ValueError(f"sync_fast_path must be one of {FAST_PATH_MODES}, got {mode!r}")
        self.fast_path = mode
        self._fast = self._fast_target = None  # decided again at the next sync

    def why_not_fast(self, target) -> str | None:
        """None when the fast path applies to the engine's `WeightTarget` (building its copy program),
        else the reason."""
        if self.fast_path == "off":
            return "actor_rollout_ref.rollout.sync_fast_path=off"
        if target is self._fast_target:
            return None if self._fast is not None else self.fast_reason
        self._fast, self._fast_target = None, target
        self.fast_reason = target.why_not_copy
        if self.fast_reason is None:
            from mcore_rl.resharding.fast_path import FastSync, NotApplicable

            try:
                self._fast = FastSync(self.model, target.copy_slots())
            except NotApplicable as e:
                self.fast_reason = str(e)
            except (AttributeError, KeyError, TypeError) as e:  # an engine layout the program does not know
                self.fast_reason = f"fast-path program failed: {type(e).__name__}: {e}"
        self.fast_reason = _agree(self.fast_reason)
        if self.fast_reason is not None:
            self._fast = None
        if self.fast_reason is None:
            _say(f"mcore_rl: weight sync: fast path ({len(self._fast.program.copies)} copies, "
                 f"{len(self._fast.program.gathers)} QKV gathers, built in {self._fast.build_seconds * 1e3:.0f} ms)")
        else:
            _say(f"mcore_rl: weight sync: HF-named path ({self.fast_reason})")
        return self.fast_reason

    def _buckets(self, stats: dict):
        bucket, size = [], 0
        for name, t in iter_hf_tensors(self.model, params=self.params):
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                yield from bucket
                bucket, size = [], 0
            bucket.append((name, t))
            size += nbytes
            stats["bytes"] += nbytes
            stats["tensors"] += 1
        yield from bucket

    def sync(self, engine) -> dict[str, float]:
        """The whole update: ``engine.update_weights(self.load)``."""
        return engine.update_weights(self.load)

    @torch.no_grad()
    def load(self, target) -> dict[str, float]:
        """Loader for `RolloutEngine.update_weights`: the adapters alone with ``lora_sync="adapter"``,
        else the fast path where it applies, else the HF-named path; returns seconds, bytes,
        tensors, GB/s and ``sync/fast`` (1 or 0)."""
        if self.lora is not None:
            return self.load_adapter(target)
        if self.why_not_fast(target) is None:
            return {**self._fast.sync(), "sync/fast": 1.0}
        return self.load_hf(target)

    @torch.no_grad()
    def load_hf(self, target) -> dict[str, float]:
        """The HF-named path, always (the general case, and the fast path's oracle)."""
        stats = {"bytes": 0, "tensors": 0}
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        target.load_hf(self._buckets(stats))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"sync/seconds": dt, "sync/bytes": stats["bytes"], "sync/tensors": stats["tensors"],
                "sync/GBps": stats["bytes"] / dt / 1e9 if dt > 0 else 0.0, "sync/fast": 0.0}

    @torch.no_grad()
    def load_adapter(self, target) -> dict[str, float]:
        """The adapter path (see the module docstring): gather (collective), write, load."""
        from converters.adapter import lora_meta, write_adapter

        if target.load_adapter is None:
            raise RuntimeError("lora_sync='adapter': the rollout engine does not serve LoRA adapters")
        if self._adapter_root is None:
            self._adapter_root = adapter_root()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tensors = dict(iter_lora_tensors(self.model))
        self._adapters += 1  # a fresh folder each time: the engine may read the last one until it has the new one
        path = os.path.join(self._adapter_root.name, str(self._adapters))
        write_adapter(path, tensors, lora_meta(self.lora), self.base_model)
        target.load_adapter(path)
        shutil.rmtree(os.path.join(self._adapter_root.name, str(self._adapters - 1)), ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._adapters == 1:
            _say(f"mcore_rl: weight sync: LoRA adapters alone ({len(tensors)} tensors, {nbytes / 2**20:.1f} MiB), "
                 f"served by the engine over its base weights")
        return {"sync/seconds": dt, "sync/bytes": nbytes, "sync/tensors": len(tensors),
                "sync/GBps": nbytes / dt / 1e9 if dt > 0 else 0.0, "sync/fast": 0.0}
