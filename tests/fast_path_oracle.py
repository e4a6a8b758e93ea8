"""The fast weight sync's oracle: the HF-named path, compared bit for bit (GPU tests, benchmarks)."""

from __future__ import annotations

import torch


def snapshot(params: dict[str, torch.Tensor], device=None) -> dict[str, torch.Tensor]:
    """A copy of every tensor (for bit-exact comparisons), on `device` (default: its own)."""
    return {n: p.detach().to(device, copy=True) if device is not None else p.detach().clone()
            for n, p in params.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (or are missing on one side); `b` may live on
    another device than `a` (compared one tensor at a time on `b`'s device)."""
    bad = sorted(set(a) ^ set(b))
    for n in sorted(set(a) & set(b)):
        x, y = a[n], b[n].detach()
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(_bits(x.to(y.device).contiguous()),
                                                                        _bits(y.contiguous())):
            bad.append(n)
    return bad


def engine_params(engine) -> dict[str, torch.Tensor]:
    """The engine's parameters, through its weight-update interface."""
    return {n: s.param for n, s in engine.weight_target().copy_slots().slots.items()}


def scramble(params: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Overwrite every parameter, so that a copy the program misses shows."""
    g = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.data.normal_(generator=g) if p.dtype.is_floating_point else p.data.zero_()


@torch.no_grad()
def check_against_hf_path(engine, resharder, fast) -> list[str]:
    """Load with the HF-named path, snapshot, scramble, load with `fast` (a `FastSync`),
    compare every engine parameter. Returns the names that differ (empty: identical). Both
    loads run inside ``engine.update_weights``. The snapshot is kept on the GPU when it fits
    with room to spare, else in host memory."""
    engine.update_weights(resharder.load_hf)
    params = engine_params(engine)
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    on_gpu = torch.cuda.is_available() and torch.cuda.mem_get_info()[0] > 1.5 * nbytes + (4 << 30)
    ref = snapshot(params, None if on_gpu or not torch.cuda.is_available() else torch.device("cpu"))

    def scrambled_then_fast(target):
        scramble(params)
        return fast.sync()

    engine.update_weights(scrambled_then_fast)
    return compare(ref, params)
