"""`mcore-rl export --ckpt DIR --out DIR`: a training checkpoint's actor as a HuggingFace model.

--ckpt may be a step directory (checkpoints/step_00000020), a checkpoints directory or a run's
output directory (its newest complete checkpoint is taken). A checkpoint's `actor/` is a
converter checkpoint, so this is `mcore-rl convert mcore-to-hf` on it; the result loads with
transformers' `from_pretrained` and with vLLM.
"""

from __future__ import annotations

import argparse
import os
import sys


def find_actor(ckpt: str) -> str:
    from converters.checkpoint import META
    from mcore_rl.trainer.checkpointing import resolve_resume

    if os.path.exists(os.path.join(ckpt, META)):  # already an actor dir
        return ckpt
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist (give a step dir, a checkpoints dir or a run's output dir)")
    step_dir = resolve_resume(ckpt, os.path.join(ckpt, "checkpoints"), name="--ckpt")
    actor = os.path.join(step_dir, "actor")
    if not os.path.exists(os.path.join(actor, META)):
        raise FileNotFoundError(f"{step_dir} has no actor checkpoint ({actor}/{META} missing)")
    return actor


def main(argv: list[str] | None = None) -> int:
    from mcore_rl.cli import guarded

    return guarded("mcore-rl export", _export, list(sys.argv[1:] if argv is None else argv))


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mcore-rl export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="step dir, checkpoints dir, or run output dir")
    p.add_argument("--out", required=True, help="where the HF model goes (must not exist or be empty)")
    p.add_argument("--shard-mb", type=int, default=2048, help="size of each safetensors file")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    from converters.checkpoint import check_output_dir, mcore_to_hf
    from mcore_rl.trainer.checkpointing import STATE

    if args.shard_mb < 0:
        raise ValueError(f"--shard-mb {args.shard_mb}: must be >= 0 (0: one tensor per file)")
    actor = find_actor(args.ckpt)
    step_dir = os.path.dirname(os.path.abspath(actor))
    check_output_dir(args.out, args.force, inputs=(step_dir if os.path.exists(os.path.join(step_dir, STATE)) else actor,))
    mcore_to_hf(actor, args.out, force=args.force, shard_mb=args.shard_mb)
    print(f"exported {actor} -> {args.out}")
    return 0


if __name__ == "__main__":
    from mcore_rl.cli import exiting

    sys.exit(exiting(main()))
