"""GPU memory of a training step, LoRA actor against full fine-tuning (default: Qwen2.5-7B shape, TP=2).

Each mode runs in its own `torchrun` (a clean allocator), as the trainer sets the actor up:
random bf16 weights, `mcore_rl.models.lora.add_lora` for LoRA (base frozen), megatron's DDP and
optimizer (`wrap_for_training`: Adam, fp32 master weights and gradients), then `--steps`
optimizer steps of `--micro` micro-batches of `--mbs` x `--seq` random tokens. Rank 0 reports
what torch allocated on its GPU after each stage:

  weights      the model shard (bf16), adapters included
  +ddp/master  megatron's gradient buffers and the optimizer's fp32 master copies
  +adam        Adam's moments (allocated at the first step; `adam_state_M` counts their elements)
  peak         the most allocated during a step (activations included)

    torchrun --nproc_per_node=2 benchmarks/lora_memory.py                       # GPU, both modes
    python benchmarks/lora_memory.py --size tiny --tp 1 --gpus 1 --seq 32 --micro 1   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
sys.path.insert(0, HERE)
import common  # noqa: E402

GiB = 2**30


def _allocated() -> float:
    import torch

    return torch.cuda.memory_allocated() / GiB if torch.cuda.is_available() else 0.0


def one_mode(args) -> dict:
    """The measured run of one mode (inside torchrun)."""
    import torch
    import torch.distributed as dist

    from grpo_step import model_config
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models import lora
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs
    from mcore_rl.models.optim import wrap_for_training

    gpu = torch.cuda.is_available()
    init_distributed(args.tp, 1)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(model_config(args.size, args.seq), f)
        spec = arch_from_hf_config(d)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = build_model(spec, dtype=dtype, use_cpu_initialization=not gpu)
    if args.mode == "lora":
        lora.add_lora(model, lora.LoRAConfig(args.rank, args.alpha, lora.resolve_targets(args.targets, spec)))
    params = list(model.parameters())  # this rank's shard, as the memory columns are
    trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    r = {"mode": args.mode, "trainable_M": trainable / 1e6, "params_M": total / 1e6, "weights_GiB": _allocated()}
    ddp, opt = wrap_for_training(model)
    r["ddp_master_GiB"] = _allocated() - r["weights_GiB"]
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    batches = [{"input_ids": torch.randint(0, spec.vocab_size, (args.mbs, args.seq), generator=g).to(device)}
               for _ in range(args.micro)]
    n = args.micro * args.mbs * (args.seq - 1)

    def loss_fn(logits, mb):
        logp, _ = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], spec.vocab_size)
        return -logp.sum() / n, {}

    peaks = []
    for step in range(args.steps):
        before = _allocated()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        run_microbatches(ddp, batches, loss_fn)
        opt.step()
        if gpu:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() / GiB)
        if step == 0:
            r["adam_GiB"] = _allocated() - before
    r["peak_GiB"] = max(peaks) if peaks else 0.0
    inner = getattr(opt, "optimizer", opt)  # Adam's moments, counted (any device)
    r["adam_state_M"] = sum(t.numel() for st in inner.state.values() for k, t in st.items()
                            if torch.is_tensor(t) and k != "step") / 1e6
    r["after_steps_GiB"] = _allocated()
    if dist.get_rank() == 0 and args.result:
        with open(args.result, "w") as f:
            json.dump(r, f)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7B")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=None, help="processes per run (default: --tp)")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--out", default=None)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)    # inside torchrun: the mode to run
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)  # inside torchrun: where rank 0 writes
    args = ap.parse_args(argv)
    if args.mode:
        one_mode(args)
        return 0
    rows = []
    for mode in args.modes.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as res:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.gpus or args.tp}",
                   "--master_port=29731", os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--mode", mode, "--result", res.name]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [common.REPO, os.environ.get("PYTHONPATH")])))
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                rc, tail = p.returncode, (p.stdout + p.stderr)[-2000:]
            except subprocess.TimeoutExpired:
                rc, tail = 124, "timed out"
            if rc != 0:
                print(f"{mode}: rc {rc}\n{tail}", flush=True)
                rows.append({"mode": mode, "weights_GiB": f"failed (rc {rc})"})
                continue
            rows.append(json.load(open(res.name)))
            print(rows[-1], flush=True)
    env = common.env_info()
    path = common.save("lora_memory", {"env": env, "args": vars(args), "rows": rows}, args.out)
    print(f"\n{env['date']}  {env['device']}  ({path})")
    print(common.table(rows, ["mode", "trainable_M", "params_M", "adam_state_M", "weights_GiB", "ddp_master_GiB", "adam_GiB", "peak_GiB"],
                       f"Qwen2.5-{args.size} shape, TP={args.tp}, rank 0's GPU (GiB allocated by torch); LoRA r={args.rank} "
                       f"on {args.targets}; {args.micro} x {args.mbs} x {args.seq} tokens a step"))
    return 0 if all(isinstance(r.get("weights_GiB"), float) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
