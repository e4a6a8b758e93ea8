"""`mcore-rl info`: versions, devices, and which accelerators are usable here."""

from __future__ import annotations

import importlib
import platform
import sys


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # report why, not just "missing"
        return f"not usable ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def main(argv: list[str] | None = None) -> int:
    import torch

    from mcore_rl import __version__

    rows = [
        ("mcore_rl", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("megatron-core", _version("megatron.core")),
        ("transformers", _version("transformers")),
        ("vllm", _version("vllm")),
        ("transformer-engine", _version("transformer_engine")),
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows.append(("devices", f"{len(names)} x CUDA: {', '.join(sorted(set(names)))}"))
        rows.append(("backend", "nccl; megatron-core runs natively on CUDA"))
    else:
        rows.append(("devices", f"CPU only ({torch.get_num_threads()} threads)"))
        rows.append(("backend", "gloo; megatron-core runs through mcore_rl's CPU support"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    from mcore_rl.cli import exiting

    sys.exit(exiting(main()))
