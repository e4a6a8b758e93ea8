"""`mcore-rl generate --hf-path DIR --prompts FILE [--tp N]`: check a model end to end.

Loads the checkpoint the Megatron way (HF -> this rank's TP shard), pushes it through the
resharder into the rollout engine, and prints the completions. Greedy by default. With
`--tp N` run it under `torchrun --nproc_per_node=N` (or srun); rank 0 prints.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mcore-rl generate", description=__doc__)
    p.add_argument("--hf-path", required=True)
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--tp", type=int, default=1, help="training tensor parallelism (= world size / PP)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    if not os.path.exists(args.prompts):
        print(f"mcore-rl generate: error: no prompts file {args.prompts}", file=sys.stderr)
        return 2
    prompts = [line.rstrip("\n") for line in open(args.prompts) if line.strip()]

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from converters.checkpoint import resolve_dtype
    from converters.hf_io import load_hf_into_model
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.resharding import Resharder
    from mcore_rl.rollout import Sampling, make_engine

    spec = arch_from_hf_config(args.hf_path)
    spec.check_parallel(args.tp, 1)
    init_distributed(args.tp, 1)
    dtype = resolve_dtype(args.dtype, spec.hf_config)
    model = build_model(spec, dtype=dtype)
    load_hf_into_model(model, spec, args.hf_path)
    engine = make_engine(args.engine, model_path=args.hf_path, dtype=str(dtype).replace("torch.", ""),
                         max_model_len=min(spec.max_position_embeddings, 4096))
    stats = Resharder(model).sync(engine)
    tok = AutoTokenizer.from_pretrained(args.hf_path)
    ids = [tok(p_)["input_ids"] for p_ in prompts]
    outs = engine.generate(ids, Sampling(temperature=args.temperature, max_tokens=args.max_tokens, seed=0))
    if dist.get_rank() == 0:
        print(f"synced {stats['sync/tensors']} tensors ({stats['sync/bytes'] / 1e6:.1f} MB) in {stats['sync/seconds']:.3f}s")
        for prompt, o in zip(prompts, outs):
            print(f"--- {prompt!r}\n{tok.decode(o.token_ids, skip_special_tokens=True)}  [{o.finish_reason}]")
    engine.close()
    return 0


if __name__ == "__main__":
    from mcore_rl.cli import exiting

    sys.exit(exiting(main()))
