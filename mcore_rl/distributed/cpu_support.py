"""Run megatron-core on a machine without CUDA (CI, laptops), over gloo.

megatron-core assumes a GPU in a handful of places. `activate()` redirects exactly those,
and only when `torch.cuda.is_available()` is False; on a GPU it does nothing, so GPU
behaviour never changes. What it redirects and why:

1. Device placement. `torch.cuda.current_device()` is used as `device=` for buffers
   (GlobalMemoryBuffer, DDP param/grad buffers, pipeline p2p receive buffers, rotary
   embeddings, sequence-parallel gathers, checkpoint save), and `device='cuda'` / `.cuda()`
   are hard-coded in the optimizer (FP32Optimizer, MixedPrecisionOptimizer), grad-norm
   clipping, `local_multi_tensor_l2_norm` and the schedules' `total_num_tokens`.
   `current_device()` returns 0 and a `TorchFunctionMode` rewrites every cuda (or integer)
   device argument, `.cuda()` and `.to('cuda')` to the CPU (to `parallel.device()`: ``cpu:0``
   in strict device mode, so that tests can tell these buffers from host tensors).
2. The RNG tracker (`tensor_parallel/random.py`) saves and restores CUDA generator states;
   they are pointed at the CPU default generator, so `model_parallel_cuda_manual_seed` and
   `get_cuda_rng_tracker().fork()` behave as on a GPU (forked streams per TP rank).
3. `tensor.type() == 'torch.cuda.FloatTensor'` asserts in clip_grads.py and the optimizers'
   param-group builders: `Tensor.type()` reports the cuda type name for CPU tensors.
4. `torch.cuda.synchronize()` (p2p communication, checkpoint writer), `current_stream()` /
   `Stream` / `Event` / `stream()` (DDP grad sync, 0.19's `start_grad_sync`), `empty_cache`,
   `nvtx` ranges: no-ops.

With these, TP, PP (1F1B via `get_forward_backward_func`), DP, megatron DDP,
`get_megatron_optimizer` (incl. the distributed optimizer) and `dist_checkpointing` run on
gloo. One trap is left to the caller: interleaved PP with `batch_p2p_comm=True` over gloo swaps
activations silently (a wrong loss, no error); the model builder sets `batch_p2p_comm=False` on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites cuda device arguments to cpu; reports cuda type names from `Tensor.type()`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE.get(name, name)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs["device"] = _target()
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _target(), *args[2:])
        return func(*args, **kwargs)


def _target() -> torch.device:
    """What cuda devices become: `parallel.device()`, i.e. cpu, or cpu:0 in strict device mode
    (`parallel.strict_device_mode`), where megatron's own buffers must count as device tensors."""
    from mcore_rl.distributed.parallel import device

    return device()


class _NoStream:
    """Stands in for torch.cuda.Stream / Event / stream(): everything runs in order on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *a, **k: None


def active() -> bool:
    return _ACTIVE


def activate() -> bool:
    """Install the CPU redirects if CUDA is absent. Idempotent; returns whether active."""
    global _ACTIVE
    if _ACTIVE or torch.cuda.is_available():
        return _ACTIVE
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                      range=lambda *a, **k: contextlib.nullcontext(),
                                      mark=lambda *a, **k: None)
    # CUDA RNG -> CPU default generator (device arguments are ignored: there is one "device").
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it calls back into torch.cuda
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.random.manual_seed = cuda.manual_seed

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    # The tracker warns when the CPU generator moves inside a fork; on CPU that *is* the
    # forked generator, so the warning is expected noise.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda rec: "CPU RNG state changed within GPU RNG context" not in rec.getMessage())

    _CudaToCpu().__enter__()  # stays on the mode stack for the life of the process
    _ACTIVE = True
    return True
