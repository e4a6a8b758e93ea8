"""Per-rank bytes moved by collectives and peak host memory per step of the trainer's data path.

Runs the real `PPOTrainer.train_step` (toy task, PPO with critic and reference: the most
per-token tensors) on 1, 2, 4, 8 gloo processes, with two stand-ins that keep it about data,
not compute: a synthetic rollout engine (random tokens, seeded per prompt, instant) and the
Megatron forward/backward replaced by copies of the rollout log-probs (what the log-prob and
update phases *move* is kept: the old code's DP all-gather of their outputs; the new code's
mini-batch denominators). Everything else is the trainer's own code: rollout slice, scoring,
samples to training shards, log-prob inputs, advantages, metrics.

Every torch.distributed call is counted on each rank by the bytes it receives: the others'
parts of an all-gather (object collectives by pickled size), the tensor of an all-reduce or a
broadcast, the receives of point-to-point. Peak RSS is sampled every 2 ms.

    python benchmarks/data_path.py                          # this checkout, 1 2 4 8 processes
    python benchmarks/data_path.py --old /tmp/old_tree      # and another tree (e.g. `git archive` of an older commit)
    python benchmarks/data_path.py --world 2 --prompts 64 --n 4 --response 64    # quick
    python benchmarks/data_path.py --world 2,4,8 --tp 2     # samples move inside each TP group
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ worker side
class Counter:
    """Wraps torch.distributed's collectives; bytes per category of caller."""

    def __init__(self):
        self.bytes: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, op: str, n: float) -> None:
        where = "data"
        for f in inspect.stack()[2:]:
            path = f.filename
            if "megatron" in path:
                where = "model"
                break
            if "resharding" in path or "converters" in path:
                where = "weight sync"
                break
            if "/mcore_rl/" in path:
                break
        key = f"{where}:{op}"
        self.bytes[key] = self.bytes.get(key, 0) + n
        self.calls[key] = self.calls.get(key, 0) + 1

    def reset(self):
        self.bytes, self.calls = {}, {}

    def install(self):
        import torch.distributed as dist

        def nbytes(t):
            return t.numel() * t.element_size()

        def ws(group):
            return dist.get_world_size(group)

        def wrap(name, size_fn):
            orig = getattr(dist, name)

            def wrapper(*args, **kwargs):
                out = orig(*args, **kwargs)
                try:
                    self.add(name, size_fn(*args, **kwargs))
                except Exception as e:  # counting must never break the run
                    print(f"data_path: could not size {name}: {e}", file=sys.stderr)
                return out

            setattr(dist, name, wrapper)

        wrap("all_reduce", lambda t, *a, **k: nbytes(t))
        wrap("broadcast", lambda t, src=None, group=None, **k: 0 if dist.get_rank() == src else nbytes(t))
        wrap("all_gather", lambda out, t, group=None, **k: nbytes(t) * (len(out) - 1))
        wrap("all_gather_into_tensor", lambda out, t, group=None, **k: nbytes(out) - nbytes(t))
        wrap("reduce_scatter_tensor", lambda out, t, group=None, **k: nbytes(t) - nbytes(out))

        def gather_object(out, obj, group=None):
            mine = len(pickle.dumps(obj))
            return sum(len(pickle.dumps(o)) for o in out) - mine

        wrap("all_gather_object", gather_object)

        def bcast_objects(objs, src=None, group=None, **k):
            return 0 if dist.get_rank() == src else sum(len(pickle.dumps(o)) for o in objs)

        wrap("broadcast_object_list", bcast_objects)
        wrap("batch_isend_irecv", lambda ops: sum(nbytes(op.tensor) for op in ops if op.op is not dist.isend))
        wrap("recv", lambda t, *a, **k: nbytes(t))


class PeakRSS:
    def __init__(self):
        self.peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def reset(self):
        self.peak = self.now()


def _synthetic_engine(vocab: range):
    """Instant rollouts: random digit tokens and log-probs, seeded per prompt (layout-free)."""
    import torch

    from mcore_rl.rollout.base import RolloutEngine, RolloutOutput, WeightTarget

    def consume(weights):
        for _ in weights:
            pass

    class SyntheticEngine(RolloutEngine):
        target = WeightTarget(load_hf=consume, why_not_copy="synthetic engine")

        def weight_target(self):
            return self.target

        def generate(self, prompts, sampling):
            outs = []
            for i in range(len(prompts)):
                g = torch.Generator().manual_seed(sampling.request_seed(i))
                for k in range(sampling.n):
                    n = int(torch.randint(sampling.max_tokens // 2, sampling.max_tokens + 1, (1,), generator=g))
                    ids = torch.randint(vocab.start, vocab.stop, (n,), generator=g).tolist()
                    lps = (-torch.rand(n, generator=g)).tolist()
                    outs.append(RolloutOutput(i, ids, lps, "length" if n == sampling.max_tokens else "stop", k))
            return outs

    return SyntheticEngine()


def _stand_ins(trainer_mod):
    """Model calls replaced by what they move (old code: DP all-gather of the outputs)."""
    import mcore_rl.trainer.batch as batch_mod
    try:
        import mcore_rl.trainer.ppo_update as workers
    except ImportError:  # a checkout from before the module's rename
        import mcore_rl.trainer.workers as workers

    new = hasattr(batch_mod, "Shard")
    if new:
        def logprobs(model, shard, micro, with_entropy=False):
            return shard.rollout_logprobs.clone(), None

        def values(critic, shard, micro):
            return shard.rollout_logprobs.clone()

        def update(model, opt, shard, cfg, minis, dp_group, _which="actor"):
            agg = cfg.critic.loss_agg_mode if _which == "critic" else cfg.actor_rollout_ref.actor.loss_agg_mode
            workers.mini_batch_denominators(shard, minis, agg, dp_group)
            return {f"{_which}/skipped_updates": 0}
    else:
        def logprobs(model, batch, micro, with_entropy=False):
            rows = workers._my_rows(len(batch["input_ids"]))
            return workers._gather_dp(batch["rollout_logprobs"][rows.start:rows.stop].clone()), None

        def values(critic, batch, micro):
            return logprobs(critic, batch, micro)[0]

        def update(model, opt, batch, cfg, mini_rows, _which="actor"):
            return {f"{_which}/skipped_updates": 0}

    trainer_mod.compute_logprobs, trainer_mod.compute_values = logprobs, values
    trainer_mod.update_actor = update
    trainer_mod.update_critic = lambda *a, **k: update(*a, **k, _which="critic")
    return new


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    import mcore_rl.rollout as rollout
    import mcore_rl.trainer.ppo_trainer as trainer_mod
    from mcore_rl.config import load_config
    from mcore_rl.toy import TOY_VOCAB

    rollout.make_engine = lambda name, **kw: _synthetic_engine(range(3, len(TOY_VOCAB)))
    new = _stand_ins(trainer_mod)
    counter, rss = Counter(), PeakRSS()
    counter.install()
    cfg = load_config(None, [
        f"data.train_batch_size={args.prompts}", f"actor_rollout_ref.actor.ppo_mini_batch_size={args.mini}",
        f"actor_rollout_ref.rollout.n={args.n}", f"data.max_response_length={args.response}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1", "critic.ppo_micro_batch_size_per_gpu=1",
        f"data.toy_size={max(4096, 2 * args.prompts)}", f"trainer.output_dir={args.out}/run",
        "trainer.resume=off", "trainer.logger=[console]", "actor_rollout_ref.rollout.name=hf",
        f"actor_rollout_ref.actor.megatron.tensor_model_parallel_size={getattr(args, 'tp', 1)}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1"])
    trainer = trainer_mod.PPOTrainer(cfg)
    rank = trainer.rank
    rows, init = [], rss.now()
    for step in range(1, args.steps + 1):
        counter.reset()
        rss.reset()
        before = rss.now()
        trainer.step = step
        t = time.perf_counter()
        trainer.train_step()
        rows.append({"step": step, "rank": rank, "world": trainer.world, "new": new,
                     "seconds": time.perf_counter() - t, "rss_init": init, "rss_before": before, "rss_peak": rss.peak,
                     "bytes": dict(counter.bytes), "calls": dict(counter.calls)})
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    import torch.distributed as dist

    dist.barrier()
    trainer.close()


# ------------------------------------------------------------------ launcher side
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tree: str, world: int, args) -> list[dict]:
    out = tempfile.mkdtemp(prefix=f"data_path_w{world}_")
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # worker options through the environment: torchrun's own parser would take `--n` for `--nnodes`
    env["DATA_PATH_WORKER"] = json.dumps({"out": out, "prompts": args.prompts, "mini": args.mini, "n": args.n,
                                          "response": args.response, "steps": args.steps, "tp": args.tp})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_port()}",
           os.path.abspath(__file__)]
    r = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode:
        raise RuntimeError(f"{tree} world {world} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return [row for rk in range(world) for row in json.load(open(os.path.join(out, f"rank{rk}.json")))]


def summarize(rows: list[dict], step: int) -> dict:
    rows = [r for r in rows if r["step"] == step]
    data = [sum(v for k, v in r["bytes"].items() if k.startswith("data:")) for r in rows]
    every = [sum(r["bytes"].values()) for r in rows]
    return {"world": rows[0]["world"], "new": rows[0]["new"], "data_KB_max": max(data) / 1e3,
            "all_KB_max": max(every) / 1e3, "rss_peak_MB_max": max(r["rss_peak"] for r in rows) / 2**20,
            "rss_over_init_MB_max": max(r["rss_peak"] - r["rss_init"] for r in rows) / 2**20,
            "seconds": max(r["seconds"] for r in rows),
            "by_op_KB_rank0": {k: v / 1e3 for k, v in sorted(rows[0]["bytes"].items())}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="1,2,4,8", help="process counts")
    p.add_argument("--prompts", type=int, default=512, help="prompts per step (data.train_batch_size)")
    p.add_argument("--mini", type=int, default=64, help="prompts per mini-batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--response", type=int, default=512, help="max response tokens (responses are 1/2 to 1x this)")
    p.add_argument("--steps", type=int, default=2, help="steps per run; the last is reported")
    p.add_argument("--tp", type=int, default=1, help="training TP (rollout TP is 1: TP engines feed one shard)")
    p.add_argument("--old", default=None, help="another source tree to measure the same way")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json", default=None, help="write the summaries here")
    if "DATA_PATH_WORKER" in os.environ:
        return worker(argparse.Namespace(**json.loads(os.environ["DATA_PATH_WORKER"])))
    args = p.parse_args(argv)
    trees = [("new", REPO)] + ([("old", os.path.abspath(args.old))] if args.old else [])
    results = []
    print(f"batch: {args.prompts} prompts x {args.n} samples, responses {args.response // 2}-{args.response} tokens, "
          f"mini-batch {args.mini} prompts; training TP={args.tp}, rollout TP=1; step {args.steps} reported "
          f"(max over ranks)")
    print("| code | processes | data path KB/rank/step | all collectives KB | peak RSS MB | peak RSS over the idle trainer MB | s/step |")
    print("|---|---|---|---|---|---|---|")
    for world in [int(w) for w in args.world.split(",")]:
        for name, tree in trees:
            s = summarize(launch(tree, world, args), args.steps)
            s["code"] = name
            results.append(s)
            print(f"| {name} | {world} | {s['data_KB_max']:.1f} | {s['all_KB_max']:.1f} | {s['rss_peak_MB_max']:.0f} | "
                  f"{s['rss_over_init_MB_max']:.0f} | {s['seconds']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
