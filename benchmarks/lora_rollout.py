"""LoRA rollout, merged weights against vLLM serving the adapters: sync, generation and exactness.

Each mode is one `grpo_step.py` run (the real trainer's GRPO step, random Qwen2.5-shaped bf16
weights; see there) in its own process, under `torchrun` at TP > 1 (training and rollout TP):

  full     no LoRA: full fine-tuning, the fast-path sync of every weight (the base model's engine)
  merged   LoRA r16 on every linear, ``rollout.lora_sync=merged``: each sync gathers the weights,
           merges ``W + alpha / r * B @ A`` and loads them (HF-named path); the engine is a plain
           model, so it generates at the base model's speed
  adapter  the same actor, ``rollout.lora_sync=adapter``: each sync moves the adapters alone (peft
           format through /dev/shm) into an engine built with vLLM's LoRA layers, whose base
           weights stay (it sleeps at level 1: base to host memory and back)

Reported per mode (median of the timed steps): sync (the load itself), wake and sleep (engine
memory), their sum (what a step pays to hand the weights over), the bytes a sync moves per rank,
generation tokens/s, and the rollout/trainer mismatch: ``mismatch/kl`` and the largest
|engine - trainer| log-prob of a sampled token (``rollout/logprob_diff_max``).

    python benchmarks/lora_rollout.py                                       # GPU: 1.5B, TP=1
    python benchmarks/lora_rollout.py --size 7B --tp 2                       # 2 GPUs
    python benchmarks/lora_rollout.py --table --out DIR                      # the table of every run in DIR
    python benchmarks/lora_rollout.py --size tiny --prompts 4 --samples 4 --prompt-len 8 --response-len 16 \\
        --micro 8 --mini 2 --steps 2 --warmup 1                            # CPU dry run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
import common  # noqa: E402

MODES = {
    "full": [],
    "merged": ["actor_rollout_ref.model.lora_rank={rank}", "actor_rollout_ref.model.lora_alpha={alpha}",
               "actor_rollout_ref.rollout.lora_sync=merged"],
    "adapter": ["actor_rollout_ref.model.lora_rank={rank}", "actor_rollout_ref.model.lora_alpha={alpha}",
                "actor_rollout_ref.rollout.lora_sync=adapter"],
}
COLS = ["size", "tp", "mode", "sync_s", "wake_s", "sleep_s", "handover_s", "sync_MB_per_rank", "generate_s",
        "gen_tok_per_s", "mismatch_kl", "logprob_diff_max", "step_s"]


def row(path: str) -> dict:
    """One table row from a `grpo_step.py` result."""
    with open(path) as f:
        res = json.load(f)
    timed = [s for s in res["steps"] if not s["warmup"]] or res["steps"]

    def med(key):
        return statistics.median(s.get(key, 0.0) for s in timed)

    size, tp, mode = os.path.basename(path).removesuffix(".json").split("_")[2:5]
    r = {"size": size, "tp": int(tp.removeprefix("tp")), "mode": mode, "sync_s": med("timing/sync"),
         "wake_s": med("timing/wake"), "sleep_s": med("timing/sleep"), "sync_MB_per_rank": med("sync/bytes") / 1e6,
         "generate_s": med("timing/generate"), "gen_tok_per_s": res["derived"]["generate_tokens_per_s"],
         "mismatch_kl": med("mismatch/kl"), "logprob_diff_max": max(s["rollout/logprob_diff_max"] for s in timed),
         "step_s": med("timing/step")}
    r["handover_s"] = r["sync_s"] + r["wake_s"] + r["sleep_s"]
    return r


def print_table(out: str) -> list[dict]:
    rows = [row(p) for p in sorted(glob.glob(os.path.join(out, "lora_rollout_*.json")))]
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["tp"], r["size"], order.get(r["mode"], 9)))
    print(common.table(rows, COLS, "LoRA rollout: handover = sync + wake + sleep per step (seconds, median); "
                                   "gen_tok_per_s over the whole job"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B")
    ap.add_argument("--tp", type=int, default=1, help="training and rollout TP (GPUs per run)")
    ap.add_argument("--modes", default="full,merged,adapter")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--mini", type=int, default=16)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--port", type=int, default=29741)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per run")
    ap.add_argument("--table", action="store_true", help="only print the table of the runs in --out")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = common.out_dir(args.out)
    if args.table:
        return 0 if print_table(out) else 1
    failed = []
    for mode in args.modes.split(","):
        name = f"lora_rollout_{args.size}_tp{args.tp}_{mode}"
        overrides = [o.format(rank=args.rank, alpha=args.alpha) for o in MODES[mode]]
        if args.tp > 1:
            overrides += [f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={args.tp}",
                          f"actor_rollout_ref.rollout.tensor_model_parallel_size={args.tp}"]
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.tp}",
                   f"--master_port={args.port}"] if args.tp > 1 else [sys.executable])
        cmd = [*launch, os.path.join(HERE, "grpo_step.py"), "--size", args.size, "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--prompt-len", str(args.prompt_len),
               "--response-len", str(args.response_len), "--mini", str(args.mini), "--micro", str(args.micro),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--name", name, "--out", out, *overrides]
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [common.REPO, os.environ.get("PYTHONPATH")])))
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        if rc:
            print(f"{name}: rc {rc}", flush=True)
            failed.append(name)
    print_table(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
