"""Long-tailed generation on one GPU: one engine for the whole batch, or several engines (each its
own process, on the same GPU) for a share each.

A decode step of the in-process engine costs milliseconds of host-side Python per step and per
request; at long-tailed lengths the GPU waits on it much of the time (`rollout.py --lengths
realistic`). Processes sharing a GPU overlap one's host work with another's kernels. This script
measures how much: every engine takes whole prompts (all their samples) of one drawn workload,
each sample its own request of a drawn length (`grpo_step.length_sampler`) and seed, all engines
start each timed run together (a file barrier), and a run's time is the slowest engine's.

    python benchmarks/engines_per_gpu.py --engines 1,2 --prompts 32 --max-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import common  # noqa: E402
from grpo_step import length_sampler  # noqa: E402


def workload(args):
    """Prompts (token ids) and per-sample lengths, the same for every engine count."""
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 150000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    draw = length_sampler(args.max_tokens, random.Random(args.length_seed))
    lengths = [[draw() for _ in range(args.n)] for _ in range(args.prompts)]
    return prompts, lengths


def wait_all(barrier: str, name: str, count: int, timeout: float = 600) -> None:
    open(os.path.join(barrier, name), "w").close()
    prefix = name.rsplit(".", 1)[0]
    t0 = time.time()
    while sum(f.startswith(prefix + ".") for f in os.listdir(barrier)) < count:
        if time.time() - t0 > timeout:
            raise TimeoutError(f"barrier {prefix}: {count} engines never arrived")
        time.sleep(0.005)


def worker(args) -> None:
    import vllm

    from mcore_rl.rollout import make_engine

    prompts, lengths = workload(args)
    mine = range(args.index, args.prompts, args.count)  # whole prompts, as a DP rank takes them
    reqs = [{"prompt_token_ids": prompts[p]} for p in mine for _ in range(args.n)]
    params = [vllm.SamplingParams(n=1, temperature=1.0, max_tokens=lengths[p][s], ignore_eos=True, seed=1234 + p * args.n + s,
                                  logprobs=None if args.no_logprobs else 0, detokenize=False, flat_logprobs=True)
              for p in mine for s in range(args.n)]
    engine = make_engine("vllm", model_path=args.model, dtype="bfloat16", load_format="dummy", seed=0,
                         max_model_len=args.prompt_len + args.max_tokens, enable_sleep_mode=False,
                         gpu_memory_utilization=args.gpu_mem / args.count, kv_cache_gib=args.kv_gib / args.count)
    short = [vllm.SamplingParams(n=1, max_tokens=32, ignore_eos=True, detokenize=False) for _ in reqs]
    engine.llm.generate(reqs, short, use_tqdm=False)  # CUDA graphs, allocator: warm
    times = []
    for rep in range(args.reps + 1):  # run 0 warms the long shapes; not counted
        wait_all(args.barrier, f"r{rep}.{args.index}", args.count)
        t = time.perf_counter()
        outs = engine.llm.generate(reqs, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
        assert sum(len(c.token_ids) for o in outs for c in o.outputs) == sum(p.max_tokens for p in params)
    print(json.dumps({"index": args.index, "times": times[1:], "samples": len(reqs),
                      "tokens": sum(p.max_tokens for p in params)}), flush=True)
    engine.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="1,2", help="engine counts to measure, one after the other")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--length-seed", type=int, default=0)
    ap.add_argument("--size", default="1.5B")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the shape's (a CPU try-out)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--gpu-mem", type=float, default=0.8, help="split evenly between the engines")
    ap.add_argument("--kv-gib", type=float, default=48.0, help="KV cache in GiB, split evenly between the engines")
    ap.add_argument("--no-logprobs", action="store_true")
    ap.add_argument("--timeout", type=int, default=400, help="seconds for each engine count")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tmp", default="/tmp/mcore_rl_bench")
    # worker side
    ap.add_argument("--index", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.index >= 0:
        return worker(args)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = common.qwen25_config(args.size, max_position_embeddings=args.prompt_len + args.max_tokens,
                               **({"num_hidden_layers": args.layers} if args.layers else {}))
    model = common.write_hf_config_dir(os.path.join(args.tmp, f"engines-per-gpu-{args.size}-L{cfg['num_hidden_layers']}"), cfg)
    rows = []
    base = None
    for count in (int(c) for c in args.engines.split(",")):
        with tempfile.TemporaryDirectory() as barrier:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   "--count", str(count), "--model", model, "--barrier", barrier]
            procs = [subprocess.Popen(cmd + ["--index", str(i)], stdout=subprocess.PIPE, text=True) for i in range(count)]
            try:
                outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
            finally:
                for p in procs:
                    p.kill()
        if any(p.returncode for p in procs):
            raise SystemExit(f"{count} engines: a worker failed (exit codes {[p.returncode for p in procs]})")
        res = [json.loads([line for line in o.splitlines() if line.startswith("{")][-1]) for o in outs]
        runs = [max(r["times"][k] for r in res) for k in range(args.reps)]  # a run lasts as long as its slowest engine
        tokens = sum(r["tokens"] for r in res)
        s = common.med(runs)
        base = base or s
        rows.append({"engines": count, "samples": sum(r["samples"] for r in res), "seconds": s, "runs": runs,
                     "per_engine_s": [common.med(r["times"]) for r in res], "tokens": tokens,
                     "tokens_per_s": tokens / s, "speedup": base / s})
        print(rows[-1], flush=True)
    res = {"env": common.env_info(), "args": vars(args), "rows": rows}
    out = common.save("engines_per_gpu" + ("_nolp" if args.no_logprobs else ""), res, args.out)
    print(common.table(rows, ["engines", "samples", "seconds", "tokens", "tokens_per_s", "speedup"],
                       f"{args.prompts} prompts x {args.n} samples, up to {args.max_tokens} tokens, long-tailed"
                       f"{', no log-probs' if args.no_logprobs else ''}"))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
