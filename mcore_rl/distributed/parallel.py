"""Bring up torch.distributed and megatron-core's model-parallel groups, SPMD style.

Every rank runs the same program (torchrun, srun, or a plain `python` as a world of one).
NCCL on GPU, gloo on CPU; on CPU megatron-core's CUDA assumptions are redirected first
(`cpu_support`).
"""

from __future__ import annotations

import datetime
import math
import os
import socket

import torch
import torch.distributed as dist

from mcore_rl.distributed import cpu_support


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STRICT_DEVICE = os.environ.get("MCORE_RL_STRICT_DEVICE", "") == "1"


def strict_device_mode(enable: bool = True) -> None:
    """Tests on CPU: `device()` answers ``cpu:0`` instead of ``cpu`` (or ``MCORE_RL_STRICT_DEVICE=1``).

    Same memory and kernels; the index lets a test tell tensors meant for the accelerator from
    host tensors and catch a host tensor in a collective, which gloo accepts and NCCL rejects
    (tests/strict_dist.py). No effect with CUDA.
    """
    global _STRICT_DEVICE
    _STRICT_DEVICE = bool(enable)


def device() -> torch.device:
    """Where this rank's model, buffers and collective tensors live."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu", 0) if _STRICT_DEVICE else torch.device("cpu")


def _launch_env() -> None:
    """Make `env://` work under torchrun, under srun without torchrun, and standalone."""
    try:
        from mcore_rl.distributed.env import export_for_torch, read_launch_env

        export_for_torch(read_launch_env())
    except ImportError:
        pass
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: float = 1800) -> None:
    """Initialise torch.distributed and megatron's TP/PP/DP groups (idempotent).

    `timeout_s` bounds every collective: a rank left waiting (another rank crashed, or took
    another code path) fails with the collective named instead of hanging the job.
    """
    from megatron.core import parallel_state, tensor_parallel

    cpu_support.activate()
    if not dist.is_initialized():
        _launch_env()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by TP={tp} x PP={pp}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) != (tp, pp):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp, distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)))
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
