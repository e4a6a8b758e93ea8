"""Who am I in this job: read the launcher's environment (torchrun, Slurm srun, or none).

Every rank runs the same program (SPMD). It may have been started by `torchrun` (which sets
RANK/WORLD_SIZE/...), by `srun` directly (which sets SLURM_PROCID/SLURM_NTASKS/...), or by
hand as one process. This module turns any of those into one `LaunchEnv`, and
`export_for_torch` writes the torch variables back so `init_process_group("env://")` works
the same way under all three.

Precedence: torchrun variables win when both are present, because `srun torchrun ...`
inside an sbatch leaves the (per-node) Slurm variables visible to every worker.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Mapping, MutableMapping

__all__ = [
    "LaunchEnv",
    "read_launch_env",
    "export_for_torch",
    "expand_hostlist",
    "expand_tasks_per_node",
    "port_from_job_id",
    "DEFAULT_MASTER_PORT",
]

DEFAULT_MASTER_PORT = 29500
# Derived ports stay below Linux's ephemeral range (32768+) so they do not collide with
# ports the kernel hands out to outgoing connections, and above common service ports.
_JOB_PORT_BASE = 20000
_JOB_PORT_SPAN = 10000

LAUNCHERS = ("torchrun", "slurm", "single")


@dataclass(frozen=True)
class LaunchEnv:
    """Position of this process in the job. `launcher` is "torchrun", "slurm" or "single"."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str
    # Host names of the nodes, in node-rank order, where the launcher tells them (Slurm).
    hostnames: tuple[str, ...] = field(default=())
    job_id: str | None = None

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local_rank {self.local_rank} out of range for local_world_size {self.local_world_size}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node_rank {self.node_rank} out of range for num_nodes {self.num_nodes}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------------------------
# Slurm string formats
# ---------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] ("a[1,2],b" -> ["a[1,2]", "b"])."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, whole: str) -> list[str]:
    """"01-03,07" -> ["01","02","03","07"]; zero padding follows the lower bound's width."""
    out = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty range in host list {whole!r}")
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"bad range {item!r} in host list {whole!r}")
            if int(hi) < int(lo):
                raise ValueError(f"descending range {item!r} in host list {whole!r}")
            width = len(lo)
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            if not item.isdigit():
                raise ValueError(f"bad index {item!r} in host list {whole!r}")
            out.append(item)
    return out


def _expand_one(pattern: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    # Several bracket groups ("r[1-2]n[1-2]") form a cartesian product, first group slowest,
    # which is the order `scontrol show hostnames` prints.
    return [head + idx + rest for idx in _expand_range_list(m.group(1), whole) for rest in _expand_one(tail, whole)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm host list ("node[01-03,07],gpu5") into host names, in Slurm's order.

    Done here instead of calling `scontrol show hostnames` because compute nodes do not
    always have the Slurm client tools, and tests must not need them.
    """
    hostlist = (hostlist or "").strip()
    if not hostlist:
        return []
    hosts: list[str] = []
    for part in _split_top_level(hostlist):
        hosts += _expand_one(part, hostlist)
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE ("2(x3),1" -> [2, 2, 2, 1])."""
    out: list[int] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if m is None:
            raise ValueError(f"cannot parse tasks-per-node {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def port_from_job_id(job_id: str | int) -> int:
    """A rendezvous port every task of a job derives alike, and that differs between jobs
    sharing a node (in [20000, 30000))."""
    digits = re.sub(r"\D", "", str(job_id))  # array jobs: "1234_5" -> "12345"
    return _JOB_PORT_BASE + int(digits or 0) % _JOB_PORT_SPAN


# ---------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------

def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    val = environ.get(key)
    if val is None or str(val).strip() == "":
        if default is None:
            raise KeyError(f"environment variable {key} is required but not set")
        return default
    try:
        return int(str(val).strip())
    except ValueError as e:
        raise ValueError(f"environment variable {key}={val!r} is not an integer") from e


def _first(environ: Mapping[str, str], *keys: str) -> str | None:
    for k in keys:
        v = environ.get(k)
        if v is not None and str(v).strip() != "":
            return str(v).strip()
    return None


def _is_torchrun(environ: Mapping[str, str]) -> bool:
    return "RANK" in environ and "WORLD_SIZE" in environ and "LOCAL_RANK" in environ


def _is_slurm_task(environ: Mapping[str, str]) -> bool:
    """True inside an `srun` task. The batch script itself also has SLURM_PROCID=0 and
    SLURM_NTASKS=N, but it is one process: a real Slurm marks srun steps with
    SLURM_STEP_ID, and always sets SLURM_JOB_ID, so "job id without step id" is the batch
    shell (treated as a single process rather than waiting forever for N-1 peers)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    in_step = _first(environ, "SLURM_STEP_ID", "SLURM_STEPID") is not None
    has_job = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID") is not None
    return in_step or not has_job


def _slurm_hosts(environ: Mapping[str, str]) -> list[str]:
    return expand_hostlist(_first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") or "")


def _read_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
    local_rank = _int(environ, "LOCAL_RANK")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", default=world)
    num_nodes = _int(environ, "GROUP_WORLD_SIZE", default=max(1, world // max(1, local_world)))
    node_rank = _int(environ, "GROUP_RANK", default=rank // max(1, local_world))
    hosts = _slurm_hosts(environ) if "SLURM_JOB_ID" in environ else []
    if len(hosts) != num_nodes:
        hosts = []
    return LaunchEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes,
        master_addr=_first(environ, "MASTER_ADDR") or "127.0.0.1",
        master_port=_int(environ, "MASTER_PORT", default=DEFAULT_MASTER_PORT),
        launcher="torchrun", hostnames=tuple(hosts),
        job_id=_first(environ, "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"),
    )


def _read_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", default=_int(environ, "SLURM_NTASKS"))
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    hosts = _slurm_hosts(environ)
    num_nodes = _int(environ, "SLURM_STEP_NUM_NODES", default=_int(environ, "SLURM_NNODES", default=len(hosts) or 1))
    local_rank = _int(environ, "SLURM_LOCALID", default=0)

    # Tasks on this node: the step's own per-node list first (it is what srun launched),
    # then the job's list, then the uniform --ntasks-per-node request.
    per_node_spec = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node_spec:
        counts = expand_tasks_per_node(per_node_spec)
        if len(counts) == 1 and num_nodes > 1:
            counts = counts * num_nodes
        if node_rank >= len(counts):
            raise ValueError(f"SLURM_NODEID={node_rank} but tasks-per-node {per_node_spec!r} lists {len(counts)} nodes")
        local_world = counts[node_rank]
    elif _first(environ, "SLURM_NTASKS_PER_NODE"):
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    else:
        local_world = max(1, world // num_nodes)

    job_id = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    master_addr = _first(environ, "MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    if "MASTER_PORT" in environ:
        master_port = _int(environ, "MASTER_PORT")
    elif job_id is not None:
        master_port = port_from_job_id(job_id)
    else:
        master_port = DEFAULT_MASTER_PORT
    if hosts and len(hosts) != num_nodes:
        raise ValueError(f"Slurm node list expands to {len(hosts)} hosts {hosts} but the step has {num_nodes} nodes")
    return LaunchEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes, master_addr=master_addr, master_port=master_port,
        launcher="slurm", hostnames=tuple(hosts), job_id=job_id,
    )


def read_launch_env(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read this process's rank, world and rendezvous point from the launcher's variables.

    Order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK present) > Slurm srun task (SLURM_PROCID)
    > a single process (rank 0 of 1; MASTER_ADDR/MASTER_PORT honoured when set, else
    127.0.0.1 and a free port).
    """
    if _is_torchrun(environ):
        return _read_torchrun(environ)
    if _is_slurm_task(environ):
        return _read_slurm(environ)
    # A world of one has no peer to agree with, so a free port avoids clashes between
    # independent single-process runs on one machine.
    port = _int(environ, "MASTER_PORT") if _first(environ, "MASTER_PORT") else _free_port()
    return LaunchEnv(
        rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1,
        master_addr=_first(environ, "MASTER_ADDR") or "127.0.0.1", master_port=port,
        launcher="single", job_id=_first(environ, "SLURM_JOB_ID", "SLURM_JOBID"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_for_torch(env: LaunchEnv, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Write the torch launcher variables for `env` into `environ` (default: os.environ), so
    `torch.distributed.init_process_group(init_method="env://")` works whoever launched us.
    Returns what was set."""
    values = {
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "GROUP_RANK": str(env.node_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    }
    environ.update(values)
    return values
