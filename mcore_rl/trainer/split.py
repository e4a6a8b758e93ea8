"""Split placement: the rollout ranks generate while the training ranks train.

Each side runs its own loop over the bridge (`mcore_rl.distributed.bridge`). Per step k:

* weights: the training ranks walk the actor's HF tensors together (`iter_hf_tensors`: TP
  gathers, PP broadcasts); training rank 0 cuts each into the parts the rollout engines' TP
  ranks read and broadcasts part j to the rollout ranks of TP rank j (one group per j), in
  buckets of at most ``rollout.sync_bucket_mb`` (plus the largest tensor). Each engine loads
  them through its own update protocol. A rollout rank receives its engine shard's share of
  the model (``rollout/sync_bytes``), not all of it; no rank holds more of the model than a
  bucket and one full-shaped tensor beyond its own shard.
* samples: the rollout engines split the step's prompts into contiguous slices; the first rank
  of each engine scores its samples and sends each training rank the part of its slice that
  rank's colocated counterpart would have generated (`train_layout.rollout_slice`), so from
  there on the training side runs the colocated code unchanged. Sampling seeds are per prompt,
  so with ``async_training.staleness=0`` the samples are the colocated run's.

Validation (`trainer.test_freq`, `val_before_train`) runs on the rollout ranks, in a message of
its own: the weights of the step to validate go out at its end (``V_k``); the rollout ranks load
them, validate, send the sums to training rank 0 and wait for the next message, whose header
then says its weights are those already loaded. The batches are a run's without validation.

Staleness (`async_training.staleness`): 0 -- batch k is generated with the weights after step
k-1, the engines idle while the trainer trains; 1 -- batch k+1 is generated while step k trains,
with the weights after step k-1 (one step behind). The order of messages on the bridge:

    staleness 0:  W0 B1 W1 B2 W2 ... B_K STOP
    staleness 1:  W0 B1 B2 W1 B3 W2 ... B_K+1 STOP   (B_k+1 arrives at the end of step k)

A resumed run starts with the weights of its checkpoint's step; with staleness 1 the batch
that was in flight was saved with the checkpoint (`pending`), so the run continues exactly.
"""

from __future__ import annotations

import signal
import threading
import time

import torch
from omegaconf import DictConfig

from converters.gather import global_params, iter_hf_tensors
from converters.mapping import NameIndex, rollout_part
from mcore_rl.distributed import device
from mcore_rl.distributed.bridge import Bridge
from mcore_rl.distributed.layout import rank_layout
from mcore_rl.trainer import build, rollouts
from mcore_rl.trainer.batch import Shard
from mcore_rl.trainer.inputs import load_inputs
from mcore_rl.trainer.validation import engine_sums, load_val_dataset

_ALIGN = 64          # bytes: every tensor of a bucket starts aligned for any dtype
_TAG_SAMPLES, _TAG_REPORT, _TAG_VAL = 1, 2, 3
# what the rollout side reports each step (first rollout rank -> training rank 0), in this order
# (its key -> the name the training side logs it under)
REPORT_NAMES = {"timing/generate": "rollout/generate_s", "timing/reward": "rollout/reward_s",
                "timing/sync": "rollout/sync_s", "rollout/weight_version": "rollout/weight_version",
                "rollout/wait_s": "rollout/wait_s", "rollout/sync_bytes": "rollout/sync_bytes"}
REPORT = tuple(REPORT_NAMES)
_LOAD_REPORT = ("timing/sync", "rollout/wait_s", "rollout/sync_bytes")  # what a weights message's load took


def engine_slice(batch: int, engines: int, e: int) -> list[int]:
    """The prompts rollout engine `e` of `engines` generates: a contiguous slice, as even as possible."""
    return list(range(e * batch // engines, (e + 1) * batch // engines))


def train_layout(cfg: DictConfig, train_world: int, rank: int = 0):
    """The training side's layout: the colocated layout of its ranks, one (virtual) rollout engine
    per TP group, whose slices say which samples each training rank receives."""
    m = cfg.actor_rollout_ref.actor.megatron
    tp = m.tensor_model_parallel_size
    return rank_layout(train_world, tp, m.pipeline_model_parallel_size, rollout_tp=tp, rank=rank)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


# ------------------------------------------------------------------------- weights
class WeightSender:
    """Training side: the actor's weights, streamed to the rollout ranks (collective over the
    training ranks; only training rank 0 talks to the bridge). Rollout TP rank j's ranks receive
    only the parts of each tensor their engine shard reads (`converters.mapping.rollout_part`)."""

    def __init__(self, actor, bridge: Bridge, bucket_mb: int):
        self.model, self.bridge, self.bucket_bytes = actor, bridge, bucket_mb * 2**20
        inner = actor.module if hasattr(actor, "module") else actor
        self.params = global_params(inner)
        self.spec, self.index = inner.mcore_rl_spec, NameIndex(inner.mcore_rl_spec)

    def _parts(self, name: str, t: torch.Tensor):
        """(shard, where in the full tensor, the part) for every rollout TP rank."""
        rule, layer = self.index.hf(name)
        part = rule.hf_names(layer).index(name)
        for j in range(self.bridge.rollout_tp):
            where = rollout_part(rule, part, t.shape, self.spec, j, self.bridge.rollout_tp)
            yield j, where, t if where is None else t.narrow(*where)

    @torch.no_grad()
    def send(self, header: dict, weights: bool = True) -> dict:
        """`header` (kind, version, ...) then, with `weights`, the weights, bucket by bucket (a bucket
        holds the parts for every rollout TP rank; each goes out over that rank's group)."""
        root, shards = self.bridge.rank == 0, range(self.bridge.rollout_tp)
        t0 = time.perf_counter()
        if root:
            self.bridge.tell_rollout(header)
        if not weights:
            return {}
        meta, parts = {j: [] for j in shards}, {j: [] for j in shards}
        size = total = 0
        for name, t in iter_hf_tensors(self.model, params=self.params):
            if not root:
                continue
            total += t.numel() * t.element_size()
            for j, where, p in self._parts(name, t):
                nbytes = p.numel() * p.element_size()
                if size and size + nbytes > self.bucket_bytes:
                    self._flush(meta, parts)
                    size = 0
                flat = p.contiguous().reshape(-1).view(torch.uint8)
                pad = -nbytes % _ALIGN
                meta[j].append((name, str(t.dtype), tuple(p.shape), nbytes + pad,
                                None if where is None else (tuple(t.shape), *where[:2])))
                parts[j].append(torch.cat([flat, flat.new_zeros(pad)]) if pad else flat)
                size += nbytes + pad
        if root:
            self._flush(meta, parts)
            self.bridge.tell_rollout(None)  # end of this transfer
        return {"sync/seconds": time.perf_counter() - t0, "sync/bytes": float(total)}

    def _flush(self, meta: dict, parts: dict) -> None:
        for j in meta:
            if meta[j]:
                self.bridge.broadcast_object(meta[j], j)
                self.bridge.broadcast(torch.cat(parts[j]), j)
                meta[j], parts[j] = [], []

    def stop(self) -> None:
        if self.bridge.rank == 0:
            self.bridge.tell_rollout({"kind": "stop"})


def receive_weights(bridge: Bridge, received: list | None = None):
    """Rollout side: (HF name, full-shaped tensor) pairs of one transfer, bucket by bucket, until
    its end marker. A tensor sent as this rank's part only is placed in a NaN-filled tensor of its
    full shape: the engine's loader reads exactly that part (a loader reading more would load
    NaNs, not stale values). Appends the bytes received to `received`."""
    while (meta := bridge.broadcast_object()) is not None:
        # the buffer is made where it is received (a host buffer would cost an upload per bucket)
        buf = bridge.broadcast(torch.empty(sum(m[3] for m in meta), dtype=torch.uint8, device=device()))
        if received is not None:
            received.append(buf.numel())
        at = 0
        for name, dtype, shape, nbytes, whole in meta:
            dt = _dtype(dtype)
            n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            t = buf[at:at + n].view(dt).view(shape)
            if whole is not None:
                full_shape, dim, start = whole
                full = torch.full(full_shape, float("nan"), dtype=dt, device=t.device)
                full.narrow(dim, start, t.size(dim)).copy_(t)
                t = full
            yield name, t
            at += nbytes


# ------------------------------------------------------------------------- samples
def send_samples(bridge: Bridge, local: Shard, slice_: list[int], tlayout, batch: int, mini: int) -> None:
    """Rollout side, an engine's first rank: to each training rank, its part of this engine's slice."""
    mine, sends = set(slice_), []
    for t in range(tlayout.world_size):
        want = [p for p in tlayout.rollout_slice(batch, mini, t) if p in mine]
        if want:
            sends.append(bridge.isend(local.take_prompts(want).to_bytes(), t, _TAG_SAMPLES))
    for work, _ in sends:
        work.wait()


def recv_samples(bridge: Bridge, tlayout, engines: int, rollout_tp: int, batch: int, mini: int, n: int,
                 seq_len: int) -> Shard:
    """Training side: this rank's (virtual) rollout slice, from the engines that generated it."""
    want = set(tlayout.rollout_slice(batch, mini))
    parts = []
    for e in range(engines):
        ps = [p for p in engine_slice(batch, engines, e) if p in want]
        if ps:
            like = torch.empty(Shard.wire_bytes(len(ps) * n, seq_len), dtype=torch.uint8)
            buf = bridge.recv(like, bridge.train_world + e * rollout_tp, _TAG_SAMPLES)
            parts.append(Shard.from_bytes(buf, len(ps) * n, seq_len))
    if not parts:
        raise RuntimeError(f"training rank {bridge.rank} received no samples")
    return Shard.cat(parts)


def send_report(bridge: Bridge, values: dict) -> None:
    work, _ = bridge.isend(torch.tensor([float(values.get(k, 0.0)) for k in REPORT], dtype=torch.float64), 0,
                           _TAG_REPORT)
    work.wait()


def recv_report(bridge: Bridge) -> dict:
    t = bridge.recv(torch.empty(len(REPORT), dtype=torch.float64), bridge.train_world, _TAG_REPORT)
    return dict(zip(REPORT, t.tolist()))


def send_val(bridge: Bridge, sums: list[float]) -> None:
    """First rollout rank -> training rank 0: a validation's batch-wide sums (`validation.engine_sums`)."""
    work, _ = bridge.isend(torch.tensor(sums, dtype=torch.float64), 0, _TAG_VAL)
    work.wait()


def recv_val(bridge: Bridge, n: int) -> list[float]:
    return bridge.recv(torch.empty(n, dtype=torch.float64), bridge.train_world, _TAG_VAL).tolist()


# ------------------------------------------------------------------------- the rollout side
class RolloutSide:
    """The loop of a rollout rank: receive weights, generate and score the step's prompts, send the
    samples to the training ranks; until the training side says stop."""

    def __init__(self, cfg: DictConfig, bridge: Bridge):
        self.cfg, self.bridge = cfg, bridge
        output_dir = cfg.trainer.output_dir or build.default_output_dir(cfg)
        self.model_path = build.model_path(cfg, output_dir)
        self.tokenizer, self.pad_id, _, self.loader, self.rewards = load_inputs(cfg, self.model_path, output_dir)
        r = cfg.actor_rollout_ref.rollout
        self.rtp = r.tensor_model_parallel_size
        rollout_world = bridge.world - bridge.train_world
        self.layout = rank_layout(rollout_world, self.rtp, 1, rollout_tp=self.rtp, rank=bridge.side_rank)
        self.engines = rollout_world // self.rtp
        self.tlayout = train_layout(cfg, bridge.train_world)
        self.val_dataset = load_val_dataset(cfg, self.tokenizer)
        self.engine = build.build_engine(cfg, self.model_path, sleep=False)  # its GPUs are its own

    def _load(self) -> dict | None:
        """The next batch's message from the training side, after the validations that come before
        it: its header (its weights loaded into the engine) and what the load took; None: stop."""
        while True:
            t = time.perf_counter()
            header = self.bridge.broadcast_object()
            wait = time.perf_counter() - t
            if header["kind"] == "stop":
                return None
            received: list[int] = []
            stats = {}
            if header["attached"]:
                stats = self.engine.update_weights(lambda target: target.load_hf(receive_weights(self.bridge, received)))
            if header["kind"] == "weights":
                return {**header, "timing/sync": stats.get("timing/sync", 0.0), "rollout/wait_s": wait,
                        "rollout/sync_bytes": float(sum(received))}
            sums = engine_sums(self.engine, self.rewards, self.tokenizer, self.layout, self.val_dataset, self.cfg)
            if self.bridge.side_rank == 0:
                send_val(self.bridge, sums)

    def _generate(self, step: int, weights: dict) -> None:
        """Step `step`'s batch, with the weights of the message `weights` (whose load it reports;
        zeros when this batch follows another with the same weights)."""
        cfg = self.cfg
        rows = self.loader.next_batch()
        slice_ = engine_slice(len(rows), self.engines, self.layout.me.rollout_dp)
        sampling = rollouts.step_sampling(cfg, step, slice_)
        timing: dict = {}
        local = rollouts.generate_and_score(self.engine, self.rewards, self.tokenizer, self.layout, rows, slice_,
                                            sampling, cfg.reward.strict, cfg.data.max_prompt_length,
                                            cfg.data.max_response_length, self.pad_id, timing)
        if self.layout.leads_engine:
            send_samples(self.bridge, local, slice_, self.tlayout, len(rows),
                         cfg.actor_rollout_ref.actor.ppo_mini_batch_size)
        if self.bridge.side_rank == 0:
            send_report(self.bridge, {**timing, **{k: weights[k] for k in _LOAD_REPORT},
                                      "rollout/weight_version": weights["version"]})

    def run(self) -> None:
        """Until the training side says stop. SIGTERM and Ctrl-C are the training side's to act on
        (it finishes the step, saves a checkpoint, then says stop): here they are only noted."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self._loop()

    def _on_signal(self, signum, frame) -> None:
        print(f"mcore_rl: rollout rank {self.bridge.rank}: {signal.Signals(signum).name} received; "
              f"generating until the training ranks stop", flush=True)

    def _loop(self) -> None:
        msg = self._load()
        if msg is None:
            return
        self.loader.load_state_dict(msg["loader"])
        for _ in range(msg["skip"]):  # batches the training side already holds
            self.loader.next_batch()
        step = msg["version"] + 1 + msg["skip"]
        if self.cfg.async_training.staleness == 1 and msg["skip"] == 0:
            self._generate(step, msg)
            step, msg = step + 1, {**msg, **dict.fromkeys(_LOAD_REPORT, 0.0)}
        while True:
            self._generate(step, msg)
            step += 1
            msg = self._load()
            if msg is None:
                return

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        if self.engine is not None:
            self.engine.close()
