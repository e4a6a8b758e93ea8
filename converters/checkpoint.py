"""HF checkpoint <-> megatron `dist_checkpointing` checkpoint.

A converted checkpoint is a directory:

    model/           megatron dist_checkpointing (torch_dist), loadable at any TP/PP
    hf/              the HF config.json, generation config and tokenizer files
    mcore_rl.json    what wrote it: architecture, dtype, the TP/PP it was written at

Both directions run SPMD on the current world (one process, or torchrun/srun ranks); the
CLI spawns TP x PP local gloo processes itself when run as one process with --tp/--pp > 1.
Each rank holds only its own shard of the model; HF tensors are read lazily one at a time
and written in bounded shards. Outputs go to a temporary sibling directory that is renamed
into place at the end, so an interrupted conversion never leaves a half-written target.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from converters.mapping import NameIndex
from converters.hf_io import HFReader, HFWriter, copy_side_files, load_hf_into_model
from mcore_rl.models.arch import arch_from_hf_config

META = "mcore_rl.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, hf_config: dict) -> torch.dtype:
    if name == "auto":
        name = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32").replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_output_dir(out: str, force: bool) -> None:
    """Refuse to write into a non-empty directory unless forced (checked before any work)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not force:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass --force to replace it")


def staging_dir(out: str) -> str:
    """A temp sibling of `out` (same filesystem, so the final rename is atomic); same on all ranks."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tag = os.environ.get("MASTER_PORT", str(os.getpid()))
    return os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{tag}")


def publish(tmp: str, out: str) -> None:
    """Atomically move `tmp` to `out`; an existing `out` (only with --force) is removed after."""
    old = None
    if os.path.exists(out):
        old = out.rstrip("/") + f".old-{int(time.time())}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(model, ckpt_dir: str) -> None:
    """dist_checkpointing save of this rank's shard (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    if _rank0():
        os.makedirs(ckpt_dir, exist_ok=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)


def load_model(model, ckpt_dir: str) -> None:
    """dist_checkpointing load into this rank's shard, whatever TP/PP the checkpoint was saved at."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no megatron checkpoint at {ckpt_dir}")
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def hf_to_mcore(hf_path: str, out: str, tp: int = 1, pp: int = 1, dtype: str = "auto", force: bool = False) -> str:
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.build import build_model

    spec = arch_from_hf_config(hf_path)
    spec.check_parallel(tp, pp)
    check_output_dir(out, force)
    reader = HFReader(hf_path)  # fails early on missing / corrupt weights
    init_distributed(tp, pp)
    if dist.get_world_size() != tp * pp:
        raise ValueError(f"hf-to-mcore runs on exactly TP x PP = {tp * pp} ranks, got {dist.get_world_size()}")
    torch_dtype = resolve_dtype(dtype, spec.hf_config)
    model = build_model(spec, dtype=torch_dtype, device=torch.device("cpu"))
    load_hf_into_model(model, spec, reader)
    tmp = staging_dir(out)
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "hf"))
        copy_side_files(hf_path, os.path.join(tmp, "hf"))
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"format": "mcore_rl/dist_checkpoint/v1", "hf_architecture": spec.hf_architecture,
                       "dtype": str(torch_dtype).replace("torch.", ""), "written_at": {"tp": tp, "pp": pp}}, f, indent=2)
    _barrier()
    save_model(model, os.path.join(tmp, "model"))
    _barrier()
    if _rank0():
        publish(tmp, out)
    _barrier()
    return out


def export_hf(model, hf_side_dir: str, out: str, force: bool = False, shard_mb: int = 2048,
              progress: bool = True) -> str:
    """Write a live (any TP/PP) model as an HF checkpoint; rank 0 writes, all ranks gather."""
    from tqdm import tqdm

    from mcore_rl.resharding.gather import build_plan, iter_hf_tensors

    check_output_dir(out, force)
    tmp = staging_dir(out)
    writer = None
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        writer = HFWriter(tmp, shard_mb=shard_mb)
    inner = model.module if hasattr(model, "module") else model
    n_hf = len(NameIndex(inner.mcore_rl_spec).all_hf_names())
    tensors = iter_hf_tensors(model, plan=build_plan(inner))
    for name, tensor in tqdm(tensors, total=n_hf, desc="export", unit="tensor", disable=not (progress and _rank0())):
        if writer is not None:
            writer.add(name, tensor)
    if _rank0():
        writer.close()
        copy_side_files(hf_side_dir, tmp)
        publish(tmp, out)
    _barrier()
    return out


def mcore_to_hf(mcore_path: str, out: str, force: bool = False, shard_mb: int = 2048) -> str:
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.build import build_model

    meta_path = os.path.join(mcore_path, META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{mcore_path} is not a converted checkpoint (no {META})")
    check_output_dir(out, force)
    with open(meta_path) as f:
        meta = json.load(f)
    hf_side = os.path.join(mcore_path, "hf")
    spec = arch_from_hf_config(hf_side)
    init_distributed(1, 1)
    model = build_model(spec, dtype=DTYPES[meta["dtype"]], device=torch.device("cpu"))
    load_model(model, os.path.join(mcore_path, "model"))
    return export_hf(model, hf_side, out, force=force, shard_mb=shard_mb)
