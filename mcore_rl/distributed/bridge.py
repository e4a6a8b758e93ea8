"""Split placement: two process worlds in one job, and the bridge between them.

With ``actor_rollout_ref.rollout.placement=split`` the job's last ``rollout.n_gpus`` ranks
only generate and the others only train. Each side gets a default process group of its own
(megatron-core builds its TP/PP/DP groups over the world it sees, and vLLM's external launcher
joins the world it finds), so the training side's collectives never wait for a rollout rank and
the reverse. Both are formed from the job's one rendezvous store under different prefixes.

The bridge is a few more groups, built directly on that store (not registered with
torch.distributed, whose default group is a side's): `all` holds every rank of the job, for
the samples sent point-to-point from the rollout engines to the training ranks; one weights
group per rollout TP rank ("shard") j holds training rank 0 and the rollout ranks of TP rank j
in every engine, for the broadcast of the weights' TP-j parts. NCCL on GPU, gloo on CPU, like
the sides; every tensor handed to a bridge op lives on `device()`.
"""

from __future__ import annotations

import datetime
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Bridge:
    side: str                 # "train" | "rollout"
    rank: int                 # in the job
    world: int                # ranks in the job
    train_world: int          # the first train_world ranks train, the others generate
    all: object               # every rank of the job (point-to-point)
    weights: dict             # rollout TP rank -> its weights group: on training rank 0 every one,
                              # on a rollout rank its own, on other training ranks none
    timeout_s: float
    rollout_tp: int = 1

    @property
    def shard(self) -> int | None:
        """A rollout rank's TP rank in its engine (which part of the weights it receives)."""
        return None if self.side == "train" else self.side_rank % self.rollout_tp

    @property
    def side_rank(self) -> int:
        return self.rank if self.side == "train" else self.rank - self.train_world

    # ---------------------------------------------------------------- point-to-point
    def isend(self, t: torch.Tensor, dst: int, tag: int = 0):
        """Send `t` to job rank `dst`; returns (work, the tensor sent), to keep until `work.wait()`."""
        x = _on_device(t)
        return self.all.send([x], dst, tag), x

    def recv(self, like: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        """A tensor of `like`'s shape and dtype from job rank `src` (host)."""
        buf = torch.empty_like(like, device=_device())
        self.all.recv([buf], src, tag).wait()
        return buf.cpu()

    # ---------------------------------------------------------------- weights group
    def broadcast(self, t: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        """`t` from training rank 0 to the rollout ranks of TP rank `shard` (a receiver: its own;
        in place on the receivers' buffer). `t` must be on `device()` already: a weight bucket
        staged in host memory costs a copy each way, and on a receiver a whole upload of
        uninitialised memory (0.8 s a sync at 1.5B on an H200)."""
        if t.device != _device():
            raise RuntimeError(f"bridge broadcast of a {tuple(t.shape)} tensor on {t.device}: make it on {_device()}")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.weights[self.shard if shard is None else shard].broadcast([t], opts).wait()
        return t

    def broadcast_object(self, obj=None, shard: int | None = None):
        """A picklable object from training rank 0 to the rollout ranks of TP rank `shard`."""
        if self.rank == 0:
            data = _on_device(torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8))
            self.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=_device()), shard)
            self.broadcast(data, shard)
            return obj
        n = int(self.broadcast(torch.zeros(1, dtype=torch.int64, device=_device())).item())
        data = self.broadcast(torch.empty(n, dtype=torch.uint8, device=_device()))
        return pickle.loads(data.cpu().numpy().tobytes())

    def tell_rollout(self, obj) -> None:
        """Training rank 0: a picklable object to every rollout rank."""
        for shard in range(self.rollout_tp):
            self.broadcast_object(obj, shard)

    # ---------------------------------------------------------------- the end
    def close(self) -> None:
        """Both sides are done: one last exchange over every rank, then the bridge's groups and
        this side's default group are shut down. Collective over the job (normal exits only).

        Without it a rank can leave while another still holds NCCL connections to it; that
        rank's exit-time teardown then waits on the peer that is gone (seen on 2 GPUs: the
        training rank hung after "Training completed" until killed)."""
        done = _on_device(torch.ones(1))
        self.all.allreduce([done]).wait()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for group in (*self.weights.values(), self.all):
            group.shutdown()
        self.weights, self.all = {}, None
        from mcore_rl.distributed.parallel import destroy

        destroy()


def _device() -> torch.device:
    from mcore_rl.distributed import device

    return device()


def _on_device(t: torch.Tensor) -> torch.Tensor:
    return t.to(_device()).contiguous()


def _direct_group(store, rank: int, size: int, timeout: datetime.timedelta):
    """A process group over `store` that torch.distributed's default group does not know of."""
    if torch.cuda.is_available():
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def _job_store(rank: int, world: int, timeout: datetime.timedelta):
    """The job's rendezvous store: torchrun's agent serves it; otherwise rank 0 does."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(host, port, world, is_master=(rank == 0 and not agent), timeout=timeout,
                         wait_for_workers=False)


def start_split(rollout_ranks: int, rollout_tp: int, timeout_s: float) -> Bridge:
    """This rank's side as its default process group, and the bridge. Collective over the job.

    Afterwards RANK / WORLD_SIZE in the environment are the side's (vLLM's external launcher and
    megatron-core read them), LOCAL_RANK (the device) is kept."""
    from mcore_rl.distributed.parallel import _launch_env

    _launch_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    train_world = world - rollout_ranks
    if not 0 < train_world < world:
        raise ValueError(f"split placement: rollout.n_gpus={rollout_ranks} leaves {train_world} of {world} ranks "
                         f"to train; both sides need at least one")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _job_store(rank, world, timeout)
    side = "train" if rank < train_world else "rollout"
    side_rank, side_world = (rank, train_world) if side == "train" else (rank - train_world, rollout_ranks)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            store=dist.PrefixStore(f"mcore_rl/{side}", store), rank=side_rank,
                            world_size=side_world, timeout=timeout)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(side_rank), str(side_world)
    all_ranks = _direct_group(dist.PrefixStore("mcore_rl/bridge", store), rank, world, timeout)
    engines = rollout_ranks // rollout_tp

    def weights_group(shard: int, wrank: int):  # training rank 0 is 0, engine e's rank is e + 1
        return _direct_group(dist.PrefixStore(f"mcore_rl/weights/{shard}", store), wrank, engines + 1, timeout)

    if rank == 0:
        weights = {j: weights_group(j, 0) for j in range(rollout_tp)}
    elif side == "rollout":
        engine, shard = divmod(rank - train_world, rollout_tp)
        weights = {shard: weights_group(shard, engine + 1)}
    else:
        weights = {}
    return Bridge(side, rank, world, train_world, all_ranks, weights, timeout_s, rollout_tp)
