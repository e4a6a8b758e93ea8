"""Run a function on N gloo ranks (spawned processes) and collect what each returns."""

import itertools
import os
import random
import socket
import tempfile

import torch
import torch.multiprocessing as mp

_PORTS = None


def free_port() -> int:
    """A free port for a rendezvous that another process binds later (spawned ranks, torchrun, whose
    --master-port=0 would leave its workers' env:// rendezvous waiting).

    Until then (seconds: that process imports torch first) anyone may take it, and a port from the
    kernel's ephemeral range (32768-60999) may meanwhile be handed to any new connection, of this test
    or of one running beside it (pytest-xdist workers). So it comes from below that range, which the
    kernel never hands out: a block of 1000 ports per worker in 10000-19999 (Slurm jobs' ports start at
    20000), taken in turn from a random place (another test session on the machine), if it binds now.
    """
    global _PORTS
    if _PORTS is None:
        worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
        base, start = 10000 + 1000 * (worker % 10), random.SystemRandom().randrange(1000)
        _PORTS = (base + (start + i) % 1000 for i in itertools.count())
    for port in itertools.islice(_PORTS, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in this worker's block of 1000")


def _entry(rank, world, port, out_dir, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Tear the groups down together: a rank that exits while a peer still talks to it can make
    # gloo's background thread abort the peer ("terminate called without an active exception").
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        from mcore_rl.distributed import destroy

        destroy()


def run_ranks(fn, world: int, *args):
    """`fn(*args)` on `world` processes with torch.distributed env set; returns per-rank results."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(world, free_port(), out, fn, args), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def in_turn(calls):
    """{key: fn(*args)} for each `key: (fn, args)` of `calls`, one after another on this rank. Run by
    `run_ranks(in_turn, world, calls)`, several cases share one set of spawned processes: starting them
    (interpreters, imports, process groups) costs more than a case. Each case sets its own TP/PP."""
    return {key: fn(*args) for key, (fn, args) in calls.items()}


def selected(request, test):
    """{case id: its parameters} of the selected cases of test function `test` in the requesting module."""
    return {item.callspec.id: item.callspec.params for item in request.session.items
            if item.module is request.module and item.originalname == test}
