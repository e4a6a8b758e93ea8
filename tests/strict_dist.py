"""Strict distributed checks on CPU: what gloo forgives and NCCL does not.

On GPUs a collective given a host tensor fails (NCCL: "No backend type associated with device
type cpu"), and ranks that issue different collectives on a group hang. gloo on CPU accepts
host tensors and often just waits, so neither shows in CPU tests. Under this harness:

* Device check. `mcore_rl.distributed.device()` answers ``cpu:0`` (strict device mode) and a
  torch function mode marks as HOST every tensor made where a GPU run would make a host tensor:
  factories called without a device or with plain ``cpu`` (torch.tensor/zeros/ones/empty/full/
  arange/as_tensor/from_numpy/...), ``Tensor.cpu()``, ``.to("cpu")``. ``cpu:0``, cuda devices
  (megatron's buffers, through `cpu_support`), ``.cuda()`` and ``.to(device())`` make device
  tensors (unmarked); a move that would alias returns a copy, as it would on a GPU. Marks
  propagate: an out-of-place op with a host input gives a host output, except that 0-dim host
  tensors mixed with device tensors give a device tensor (CUDA accepts CPU scalars there);
  in-place ops and ``out=`` keep the destination's mark. ``Tensor.device`` answers ``cpu:0``
  for device tensors and ``cpu`` for host ones, so ``torch.empty(..., device=t.device)`` follows
  ``t``. Marks live in a weak id-keyed dictionary: no tensor subclass, nothing megatron sees.
  Unmarked, so counted as device tensors: what is made outside torch functions (nn.Parameter,
  autograd's gradients, other threads) and inside the rollout engines' construction and
  generation (they place their own tensors and return Python lists).
  A host tensor reaching a collective of ``torch.distributed`` (also through megatron's module-
  level aliases) raises `HostTensorInCollective` naming the op, the tensors, the caller and
  where each became a host tensor, except on the gloo groups megatron creates for host-side
  work and in vLLM's own collectives.
* Collective order. Every collective (and object collective, and barrier) is appended to
  ``<log_dir>/rank<R>.jsonl`` as it is issued: op, group (name, global ranks), dtypes, shapes,
  src/dst and reduce op, caller. `check_logs` then requires the ranks of each group to have
  issued the same sequence on it (and sends to match receives), so a rank that took another
  code path is reported at the first call where it diverged, even when the run hung.
* Every process group gets a short timeout, so a mismatch fails in seconds, not 30 minutes.

`launch` runs ``module:function`` on N ranks (torchrun, own session, killed at a wall-clock
limit) under the harness; `check_logs` judges the logs afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS = os.path.abspath(__file__)


class HostTensorInCollective(RuntimeError):
    """A host tensor reached a collective (NCCL would reject it)."""


# ------------------------------------------------------------------------------------ marks
_HOST = WeakIdKeyDictionary()  # host tensor -> where it became one ("file:line (how)")
_DEVICE_ATTR = torch._C.TensorBase.__dict__["device"]
_STRICT = torch.device("cpu", 0)
_PLAIN = torch.device("cpu")
_TENSOR_DATA_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}


def _short(path: str) -> str:
    for root in (str(REPO) + os.sep, os.path.dirname(_TORCH_DIR.rstrip(os.sep)) + os.sep):
        if path.startswith(root):
            return path[len(root):]
    return path


def _caller() -> str:
    """file:line of the first frame outside this file and outside torch."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if name != _THIS and not name.startswith(_TORCH_DIR):
            return f"{_short(name)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _device_is_host(dev) -> bool | None:
    """True: a host device (plain cpu); False: a device (cpu:N, cuda, an index); None: neither (meta)."""
    if isinstance(dev, bool):
        return None
    if isinstance(dev, int):
        return False
    try:
        d = torch.device(dev)
    except (TypeError, RuntimeError):
        return None
    if d.type == "cuda":
        return False
    if d.type == "cpu":
        return d.index is None
    return None


def _tensors(args, kwargs) -> list:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [x for x in out if isinstance(x, torch.Tensor)]
    return []


def _to_target(args, kwargs):
    """(host?, args, kwargs) of a Tensor.to call; the device argument is made plain cpu so that a
    move within "the same device" aliases as on a GPU (cpu -> cpu:0 would always copy)."""
    host, args, kwargs = None, list(args), dict(kwargs)
    if kwargs.get("device") is not None:
        host = _device_is_host(kwargs["device"])
        if host is not None:
            kwargs["device"] = _PLAIN
    for i, a in enumerate(args[1:], 1):
        if isinstance(a, torch.Tensor):
            host = a in _HOST
        elif isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            h = _device_is_host(a)
            if h is not None:
                host, args[i] = h, _PLAIN
    return host, tuple(args), kwargs


class _Marks(TorchFunctionMode):
    """Marks host tensors (see the module docstring). Stays on the mode stack for the process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _STATE["paused"]:
            return func(*args, **kwargs)
        if getattr(func, "__self__", None) is _DEVICE_ATTR:  # t.device
            d = func(*args, **kwargs)
            return _STRICT if d.type == "cpu" and args[0] not in _HOST else d
        host = None  # what the result is: True host, False device, None: follows the inputs
        if func in _MOVES:
            if func is torch.Tensor.cpu:
                host = True
            elif func is torch.Tensor.cuda:
                host = False
            else:
                host, args, kwargs = _to_target(args, kwargs)
        elif kwargs.get("device") is not None:
            host = _device_is_host(kwargs["device"])
            if host is not None:
                kwargs = {**kwargs, "device": _PLAIN}
        out = func(*args, **kwargs)
        outs = _outputs(out)
        if not outs:
            return out
        inputs = _tensors(args, kwargs)
        if host is None:
            if func in _TENSOR_DATA_FACTORIES and args and not isinstance(args[0], torch.Tensor):
                host = True  # torch.tensor([...]) is made on the CPU whatever the list holds
            elif not inputs:
                host = True  # a factory without a device
            else:
                hosts = [t for t in inputs if t in _HOST]
                if not hosts or (len(hosts) < len(inputs) and all(t.dim() == 0 for t in hosts)):
                    return out
                origin = _HOST[hosts[0]]
                for o in outs:
                    if not any(o is t for t in inputs):
                        _HOST[o] = origin
                return out
        if func in _MOVES or kwargs.get("device") is not None:
            # a move that returned its input: on a GPU a move between host and device copies
            if isinstance(out, torch.Tensor) and inputs and out is inputs[0] and (out in _HOST) != host:
                out = out.clone()
                outs = [out]
        for o in outs:
            if any(o is t for t in inputs):
                continue  # in place / out= / no-op: the destination keeps its mark
            if host:
                _HOST[o] = f"{_caller()} ({getattr(func, '__name__', 'factory')})"
                _STATE["host_made"] += 1
            else:
                _HOST.pop(o, None)
        return out


# ------------------------------------------------------------------------------ collectives
# op -> (tensor parameters checked and compared, other parameters compared across ranks)
_COLLECTIVES = {
    "all_reduce": (("tensor",), ("op",)),
    "reduce": (("tensor",), ("dst", "op")),
    "broadcast": (("tensor",), ("src",)),
    "all_gather": (("tensor_list", "tensor"), ()),
    "all_gather_into_tensor": (("output_tensor", "input_tensor"), ()),
    "_all_gather_base": (("output_tensor", "input_tensor"), ()),
    "reduce_scatter": (("output", "input_list"), ("op",)),
    "reduce_scatter_tensor": (("output", "input"), ("op",)),
    "_reduce_scatter_base": (("output", "input"), ("op",)),
    "all_to_all_single": (("output", "input"), ()),
    "all_to_all": (("output_tensor_list", "input_tensor_list"), ()),
    "gather": (("tensor", "gather_list"), ("dst",)),
    "scatter": (("tensor", "scatter_list"), ("src",)),
}
_COMPARED_TENSORS = {"gather": ("tensor",), "scatter": ("tensor",)}  # the lists exist on one rank only
_P2P = {"send": "dst", "recv": "src", "isend": "dst", "irecv": "src"}
_ORDER_ONLY = ("barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list")
_ORIGINAL: dict[str, object] = {}
_STATE = {"log": None, "timeout": None, "paused": 0, "host_made": 0, "checked": 0}
_GROUPS: dict[int, tuple] = {}  # id(group) -> (group, name, description, global ranks)


def _group_info(group) -> tuple[str, str, list[int]]:
    pg = group if group is not None else dist.group.WORLD
    hit = _GROUPS.get(id(pg))
    if hit is None or hit[0] is not pg:
        ranks = list(dist.get_process_group_ranks(pg))
        desc = getattr(pg, "group_desc", "") or ""
        hit = _GROUPS[id(pg)] = (pg, str(getattr(pg, "group_name", "")), desc, ranks)
    return hit[1], hit[2], hit[3]


def _host_work_groups() -> list:
    """Groups megatron creates for host-side work (gloo, whatever the main backend)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None:
        return []
    found = []
    for name, value in vars(ps).items():
        if name.startswith("_") and name.endswith("_GLOO") and value is not None:
            found.extend(value if isinstance(value, (list, tuple)) else [value])
    return found


def _describe(t) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _sig_value(v):
    if isinstance(v, torch.Tensor):
        return _describe(v)
    if isinstance(v, (list, tuple)):
        return [_sig_value(x) for x in v]
    if isinstance(v, dist.ReduceOp) or type(v).__name__ in ("RedOpType", "ReduceOp"):
        return str(v).split(".")[-1]
    return v if isinstance(v, (int, float, str, type(None))) else type(v).__name__


def _write(entry: dict) -> None:
    log = _STATE["log"]
    if log is not None:
        log.write(json.dumps(entry) + "\n")


def _global(group, rank, group_rank):
    if rank is None and group_rank is not None:
        return dist.get_global_rank(group if group is not None else dist.group.WORLD, group_rank)
    return rank


def _check_host(op, named, group, where, exempt) -> None:
    """Raise if any of `named` ((parameter, tensor) pairs) is a host tensor."""
    if exempt:
        return
    _STATE["checked"] += len(named)
    hosts = [(what, t) for what, t in named if t in _HOST]
    if not hosts:
        return
    name, desc, ranks = _group_info(group)
    found = "; ".join(f"{what} {_describe(t)}, a host tensor since {_HOST[t]}" for what, t in hosts)
    msg = (f"host tensor in {op} on group {desc or name} {ranks}, called at {where}: {found}. "
           f"NCCL accepts only device tensors: make it on device() or move it with .to(device())")
    _write({"violation": msg, "at": where})
    raise HostTensorInCollective(msg)


def _ours(path: str) -> bool:
    return path.startswith(str(REPO) + os.sep) and "site-packages" not in path and path != _THIS


def _where(frame) -> tuple[str, str]:
    """(direct caller, first caller in this repository's code) of a collective."""
    direct = f"{_short(frame.f_code.co_filename)}:{frame.f_lineno}"
    f = frame
    while f is not None and not _ours(f.f_code.co_filename):
        f = f.f_back
    mine = f"{_short(f.f_code.co_filename)}:{f.f_lineno}" if f is not None and f is not frame else ""
    return direct, mine


def _exempt(group, frame) -> bool:
    if frame.f_code.co_filename.find(f"{os.sep}vllm{os.sep}") >= 0:
        return True  # vLLM's own groups and tensors: its GPU build places them itself
    return group is not None and any(group is g for g in _host_work_groups())


def _wrap_collective(name):
    orig = _ORIGINAL[name]
    sig = inspect.signature(orig)
    tensor_params, other_params = _COLLECTIVES[name]
    compared = _COMPARED_TENSORS.get(name, tensor_params)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        frame = sys._getframe(1)
        bound = sig.bind(*args, **kwargs)
        a = bound.arguments
        group = a.get("group")
        direct, mine = _where(frame)
        where = direct + (f" (from {mine})" if mine else "")
        named = [(p, t) for p in tensor_params for t in (a.get(p) if isinstance(a.get(p), (list, tuple)) else [a.get(p)])
                 if isinstance(t, torch.Tensor)]
        _check_host(name, named, group, where, _exempt(group, frame))
        gname, desc, ranks = _group_info(group)
        extra = {}
        for p in other_params:
            v = a.get(p, sig.parameters[p].default)
            if p in ("src", "dst"):
                v = _global(group, v, a.get(f"group_{p}"))
            extra[p] = _sig_value(v)
        _write({"g": gname, "desc": desc, "ranks": ranks, "op": name,
                "sig": [_sig_value(a.get(p)) for p in compared] + [extra], "at": where})
        return orig(*args, **kwargs)

    return wrapper


class _P2PWrapper:
    """send/recv/isend/irecv. A callable object that compares equal to the original, because
    `P2POp` accepts only ``op in [isend, irecv]``."""

    def __init__(self, name):
        self.name, self.orig = name, _ORIGINAL[name]
        self.sig = inspect.signature(self.orig)
        functools.update_wrapper(self, self.orig)

    def __eq__(self, other):
        return other is self or other is self.orig

    def __hash__(self):
        return hash(self.orig)

    def record(self, frame, tensor, group, peer, group_peer) -> None:
        direct, mine = _where(frame)
        where = direct + (f" (from {mine})" if mine else "")
        _check_host(self.name, [("tensor", tensor)], group, where, _exempt(group, frame))
        peer = _global(group, peer, group_peer)
        me = dist.get_rank()
        sending = _P2P[self.name] == "dst"
        _write({"p2p": [me, peer] if sending else [peer, me], "op": self.name, "sig": [_describe(tensor)],
                "at": where})

    def __call__(self, *args, **kwargs):
        a = self.sig.bind(*args, **kwargs).arguments
        key = _P2P[self.name]
        self.record(sys._getframe(1), a["tensor"], a.get("group"), a.get(key), a.get(f"group_{key}"))
        return self.orig(*args, **kwargs)


def _batch_isend_irecv(p2p_op_list):
    frame = sys._getframe(1)
    for p in p2p_op_list:
        w = p.op if isinstance(p.op, _P2PWrapper) else None
        name = w.name if w else ("isend" if p.op is _ORIGINAL["isend"] else "irecv")
        (w or _P2P_WRAPPERS[name]).record(frame, p.tensor, p.group, p.peer, None)
        p.op = _ORIGINAL[name]  # torch tells sends from receives by identity
    return _ORIGINAL["batch_isend_irecv"](p2p_op_list)


def _wrap_order_only(name):
    orig = _ORIGINAL[name]
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        a = sig.bind(*args, **kwargs).arguments
        gname, desc, ranks = _group_info(a.get("group"))
        direct, mine = _where(sys._getframe(1))
        _write({"g": gname, "desc": desc, "ranks": ranks, "op": name, "sig": [],
                "at": direct + (f" (from {mine})" if mine else "")})
        return orig(*args, **kwargs)

    return wrapper


def _with_timeout(name):
    orig = _ORIGINAL[name]
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        limit = datetime.timedelta(seconds=_STATE["timeout"])
        given = bound.arguments.get("timeout")
        bound.arguments["timeout"] = limit if given is None else min(given, limit)
        return orig(*bound.args, **bound.kwargs)

    return wrapper


_P2P_WRAPPERS: dict[str, _P2PWrapper] = {}


def _unmarked(cls, name: str) -> None:
    """Run `cls.name` without marking: rollout engines build and generate with their own
    tensors, which a GPU build places itself, and hand back Python lists (saves most of the
    harness's cost). Their collectives are still logged, and weight loading is still marked."""
    orig = getattr(cls, name)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        _STATE["paused"] += 1
        try:
            return orig(*args, **kwargs)
        finally:
            _STATE["paused"] -= 1

    setattr(cls, name, wrapper)


def _rebind_aliases() -> None:
    """Module-level aliases (megatron's ``dist_all_gather_func = torch.distributed...``) bound
    before the patch point at the wrappers too."""
    originals = {id(f): name for name, f in _ORIGINAL.items()}
    for modname, mod in list(sys.modules.items()):
        if mod is None or not modname.startswith(("megatron", "mcore_rl", "converters")):
            continue
        for attr, value in list(vars(mod).items()):
            name = originals.get(id(value))
            if name is not None and value is _ORIGINAL[name]:
                setattr(mod, attr, getattr(dist, name))


class _CheckedBridgeGroup:
    """A split-placement bridge group (built on the store, outside torch.distributed's groups): its
    point-to-point and broadcast ops get the same host-tensor check as the collectives."""

    def __init__(self, backend, name: str):
        self._backend, self._name = backend, name

    def _check(self, op: str, tensors) -> None:
        _STATE["checked"] += len(tensors)
        hosts = [t for t in tensors if t in _HOST]
        if hosts:
            found = "; ".join(f"{_describe(t)}, a host tensor since {_HOST[t]}" for t in hosts)
            msg = (f"host tensor in bridge {op} on {self._name}, called at {_caller()}: {found}. "
                   f"NCCL accepts only device tensors: make it on device() or move it with .to(device())")
            _write({"violation": msg, "at": _caller()})
            raise HostTensorInCollective(msg)

    def send(self, tensors, dst, tag):
        self._check("send", tensors)
        return self._backend.send(tensors, dst, tag)

    def recv(self, tensors, src, tag):
        self._check("recv", tensors)
        return self._backend.recv(tensors, src, tag)

    def broadcast(self, tensors, opts):
        self._check("broadcast", tensors)
        return self._backend.broadcast(tensors, opts)

    def allreduce(self, tensors):
        self._check("allreduce", tensors)
        return self._backend.allreduce(tensors)

    def shutdown(self):
        return self._backend.shutdown()


def _checked_bridge_groups() -> None:
    from mcore_rl.distributed import bridge

    make = bridge._direct_group

    def checked(store, rank, size, timeout):
        return _CheckedBridgeGroup(make(store, rank, size, timeout), f"a bridge group of {size} ranks")

    bridge._direct_group = checked


def install(log_dir: str | os.PathLike, timeout_s: float = 60.0) -> None:
    """Turn the checks on in this process (a rank of a CPU run). Idempotent."""
    if _STATE["log"] is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the strict harness emulates a device on CPU; on a GPU, NCCL checks this itself")
    _STATE["timeout"] = float(timeout_s)
    rank = int(os.environ.get("RANK", "0"))
    os.makedirs(log_dir, exist_ok=True)
    _STATE["log"] = open(os.path.join(log_dir, f"rank{rank}.jsonl"), "a", buffering=1)
    for name in (*_COLLECTIVES, *_P2P, "batch_isend_irecv", *_ORDER_ONLY, "new_group", "init_process_group",
                 "new_subgroups"):
        _ORIGINAL[name] = getattr(dist, name)
    for name in _COLLECTIVES:
        setattr(dist, name, _wrap_collective(name))
    for name in _P2P:
        _P2P_WRAPPERS[name] = _P2PWrapper(name)
        setattr(dist, name, _P2P_WRAPPERS[name])
    dist.batch_isend_irecv = _batch_isend_irecv
    for name in _ORDER_ONLY:
        setattr(dist, name, _wrap_order_only(name))
    for name in ("new_group", "init_process_group", "new_subgroups"):
        setattr(dist, name, _with_timeout(name))

    from mcore_rl.distributed import cpu_support, parallel

    parallel.strict_device_mode(True)
    cpu_support.activate()  # its mode first: ours goes above it and sees .cuda() before it is dropped
    _Marks().__enter__()
    _rebind_aliases()
    _checked_bridge_groups()
    from mcore_rl.rollout.hf_engine import HFEngine
    from mcore_rl.rollout.vllm_engine import VLLMEngine

    for cls in (HFEngine, VLLMEngine):
        _unmarked(cls, "__init__")
        _unmarked(cls, "generate")


# ------------------------------------------------------------------------------ the checks
def read_logs(log_dir, world: int) -> dict[int, list[dict]]:
    logs = {}
    for r in range(world):
        path = os.path.join(log_dir, f"rank{r}.jsonl")
        if not os.path.exists(path):
            raise AssertionError(f"rank {r} wrote no collective log ({path}): it never started under the harness")
        logs[r] = [json.loads(line) for line in open(path) if line.strip()]
    return logs


def _fmt(e: dict | None) -> str:
    if e is None:
        return "nothing (its sequence ended)"
    return f"{e['op']}{e['sig']} at {e['at']}"


def check_logs(log_dir, world: int) -> dict[str, int]:
    """Raise AssertionError listing every host tensor that reached a collective and, per group,
    the first call where its ranks' sequences differ. Returns the number of calls per group
    ("<desc or name> <ranks>", per rank) so callers can check the run did communicate."""
    logs = read_logs(log_dir, world)
    problems = [f"rank {r}: {e['violation']}" for r, entries in logs.items() for e in entries if "violation" in e]
    errors = [f"rank {r} raised {e['error']}" for r, entries in logs.items() for e in entries if "error" in e]
    groups: dict[tuple, dict[int, list]] = {}
    channels: dict[tuple, dict[str, list]] = {}
    for r, entries in logs.items():
        for e in entries:
            if "g" in e:
                groups.setdefault((e["g"], e["desc"], tuple(e["ranks"])), {}).setdefault(r, []).append(e)
            elif "p2p" in e and None not in e["p2p"]:
                side = "send" if e["op"] in ("send", "isend") else "recv"
                channels.setdefault(tuple(e["p2p"]), {"send": [], "recv": []})[side].append(e)
    counts = {}
    for (gname, desc, ranks), per_rank in sorted(groups.items(), key=lambda kv: kv[0][0]):
        label = f"group {desc or gname} {list(ranks)}"
        counts[f"{desc or gname} {list(ranks)}"] = max(len(v) for v in per_rank.values())
        seqs = {r: per_rank.get(r, []) for r in ranks}
        first = ranks[0]
        for r in ranks[1:]:
            a, b = seqs[first], seqs[r]
            for i in range(max(len(a), len(b))):
                ea = a[i] if i < len(a) else None
                eb = b[i] if i < len(b) else None
                if ea is None or eb is None or (ea["op"], ea["sig"]) != (eb["op"], eb["sig"]):
                    problems.append(f"{label}: call #{i} differs (rank {first}: {len(a)} calls, rank {r}: {len(b)}): "
                                    f"rank {first} issued {_fmt(ea)}; rank {r} issued {_fmt(eb)}")
                    break
    for (src, dst), sides in sorted(channels.items()):
        s, rv = sides["send"], sides["recv"]
        for i in range(max(len(s), len(rv))):
            es = s[i] if i < len(s) else None
            er = rv[i] if i < len(rv) else None
            if es is None or er is None or es["sig"] != er["sig"]:
                problems.append(f"p2p {src} -> {dst}: message #{i} differs: rank {src} sent {_fmt(es)}; "
                                f"rank {dst} received {_fmt(er)}")
                break
    if problems:
        raise AssertionError("strict distributed check failed:\n  " + "\n  ".join(problems + errors))
    return counts


def summaries(log_dir, world: int) -> list[dict]:
    """Per rank: host tensors made and tensors checked in collectives (to show the checks ran)."""
    return [next((e["summary"] for e in entries if "summary" in e), {}) for entries in read_logs(log_dir, world).values()]


# ------------------------------------------------------------------------------ running ranks
def launch(target: str, args=(), *, log_dir, nproc: int = 2, timeout_s: float = 60.0, wall_s: float = 300.0,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``module:function(*args)`` (JSON-able args) on `nproc` gloo ranks under the harness,
    with `timeout_s` on every process group; the whole run is killed after `wall_s`. The
    function's int return value is the rank's exit code. Logs go to `log_dir`."""
    log_dir = str(log_dir)
    os.makedirs(log_dir, exist_ok=True)
    penv = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    extra = dict(env or {})
    path = [str(REPO), str(REPO / "tests"), extra.pop("PYTHONPATH", ""), penv.get("PYTHONPATH", "")]
    penv.update(PYTHONPATH=os.pathsep.join(p for p in path if p), OMP_NUM_THREADS="1",
                VLLM_ENABLE_V1_MULTIPROCESSING="0", MCORE_RL_STRICT_DEVICE="1", TOKENIZERS_PARALLELISM="false",
                **extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           _THIS, "--log-dir", log_dir, "--timeout", str(timeout_s), target, json.dumps(list(args))]
    # A temp dir of the run's own (vLLM's and multiprocessing's socket files), with a short path: a
    # Unix socket's path may not exceed 107 bytes, which one under a test's tmp_path can.
    with tempfile.TemporaryDirectory(prefix="strict", ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryFile("w+") as out:
        penv["TMPDIR"] = tmp
        proc = subprocess.Popen(cmd, env=penv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=wall_s)
        except subprocess.TimeoutExpired:
            rc = -signal.SIGKILL
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), "")


def excerpt(output: str, limit: int = 8000) -> str:
    """The Python tracebacks in a run's output (torchrun's own report after them says little),
    else the output's tail."""
    lines, keep, i = output.splitlines(), [], 0
    while i < len(lines):
        if lines[i].lstrip("[rank0123456789]: ").startswith("Traceback (most recent call last)"):
            j = i + 1
            while j < len(lines) and lines[j][:1] in (" ", "\t", "["):
                j += 1
            keep += lines[i:j + 1]
            i = j
        i += 1
    return ("\n".join(keep) if keep else output)[-limit:]


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="run module:function on this rank under the strict harness")
    p.add_argument("--log-dir", required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("target")
    p.add_argument("args", nargs="?", default="[]")
    o = p.parse_args(argv)
    install(o.log_dir, o.timeout)
    module, fn = o.target.split(":")
    try:
        rc = getattr(importlib.import_module(module), fn)(*json.loads(o.args))
    except BaseException as e:
        traceback.print_exc()
        _write({"error": f"{type(e).__name__}: {e}"})
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # peers may be blocked in a collective: do not wait for them at exit
    rc = int(rc or 0)
    _write({"summary": {"host_tensors_made": _STATE["host_made"], "tensors_checked": _STATE["checked"]}})
    if rc == 0 and dist.is_initialized():  # tear the groups down together
        dist.barrier()
        from mcore_rl.distributed import destroy

        destroy()
    return rc


if __name__ == "__main__":
    import strict_dist  # one module instance: the target imports the same marks and wrappers

    sys.exit(strict_dist._main(sys.argv[1:]))
