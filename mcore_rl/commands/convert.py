"""`mcore-rl convert hf-to-mcore | mcore-to-hf`.

Run as one process it spawns TP x PP local gloo workers for hf-to-mcore; under torchrun or
srun it uses the ranks it is given.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcore-rl convert", description=__doc__)
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron dist_checkpointing")
    a.add_argument("--hf-path", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the conversion")
    a.add_argument("--pp", type=int, default=1, help="pipeline stages doing the conversion")
    a.add_argument("--dtype", default="auto", help="auto (from config.json) | bf16 | fp16 | fp32")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out")
    b = sub.add_parser("mcore-to-hf", help="megatron dist_checkpointing -> HF safetensors")
    b.add_argument("--mcore-path", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--shard-mb", type=int, default=2048, help="size of each safetensors file")
    b.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run(args)


def _run(args) -> None:
    from converters.checkpoint import hf_to_mcore, mcore_to_hf

    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.hf_path, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, force=args.force)
    else:
        mcore_to_hf(args.mcore_path, args.out, force=args.force, shard_mb=args.shard_mb)


def main(argv: list[str] | None = None) -> int:
    from mcore_rl.cli import guarded

    return guarded("mcore-rl convert", _convert, list(sys.argv[1:] if argv is None else argv))


def _convert(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from converters.checkpoint import check_output_dir, staging_dir
    from converters.hf_io import HFReader
    from mcore_rl.models.arch import arch_from_hf_config

    # every input check before any process or process group exists
    source = args.hf_path if args.direction == "hf-to-mcore" else args.mcore_path
    check_output_dir(args.out, args.force, inputs=(source,))
    if args.direction == "hf-to-mcore":
        if args.tp < 1 or args.pp < 1:
            raise ValueError(f"--tp {args.tp} --pp {args.pp}: both must be >= 1")
        arch_from_hf_config(args.hf_path).check_parallel(args.tp, args.pp)
        HFReader(args.hf_path)
    elif args.shard_mb < 0:
        raise ValueError(f"--shard-mb {args.shard_mb}: must be >= 0 (0: one tensor per file)")
    world = args.tp * args.pp if args.direction == "hf-to-mcore" else 1
    launched = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world > 1 and launched == 1:  # one process (also a 1-task Slurm job): start the ranks here
        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.start_processes(_worker, args=(world, port, args), nprocs=world, start_method="spawn")
        except BaseException:  # a rank failed or was stopped: its staging dir must not stay behind
            import shutil

            shutil.rmtree(staging_dir(args.out, tag=str(port)), ignore_errors=True)
            raise
    else:
        _run(args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from mcore_rl.cli import exiting

    sys.exit(exiting(main()))
