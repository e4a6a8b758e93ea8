"""Rollout throughput: our `VLLMEngine` wrapper vs standalone `vllm.LLM`, same model, prompts, sampling.

Both engines are built in one process with the same engine arguments (random
Qwen2.5-1.5B-shaped bf16 weights via ``load_format="dummy"`` -- vLLM's dummy init is seeded,
so both hold the same weights --, CUDA graphs, prefix caching, no tokenizer, raw log-probs)
and are timed alternately on the same token-id prompts with the same `SamplingParams`
(``logprobs=0``, flat log-probs, no detokenisation: what an RL rollout asks for). The
wrapper adds the prompt conversion, the per-sample `RolloutOutput` with per-token log-probs
and the finish-reason checks. ``standalone-nolp`` (no log-probs requested) shows what the
log-probs themselves cost. The optional ``wrapper-sleep`` row is the trainer's default
(``enable_sleep_mode=True``: cumem allocator). Two more rows use the wrapper's own engine, so
they run at any TP: ``wrapper-raw`` sends the wrapper's exact `SamplingParams` through
``vllm.LLM.generate`` (the wrapper's Python around the call, left out), and ``wrapper-seeded``
is the wrapper with per-sample seeds, as the trainer samples (every sample its own seed, so
that samples do not depend on which engine generates them).

Workloads (ignore_eos, so every sample has exactly max_tokens tokens):
  ``64x1x256``: 64 prompts of 64 tokens, n=1, 256 new tokens, T=1 (the baseline of earlier measurements)
  ``32x8x512``: 32 prompts of 128 tokens, n=8, 512 new tokens, T=1 (a GRPO step)

``--lengths realistic``: every sample is its own request, held to a length drawn from
`grpo_step.length_sampler` (10% at the maximum, mean a quarter of it; the same lengths for every
engine and repetition) and seeded per sample, as the trainer samples. Only the rows that call
``vllm.LLM.generate`` take per-request parameters: ``standalone``, ``standalone-nolp``,
``wrapper-raw`` (the wrapper's engine, no sleep mode: a split-placement rollout rank's engine) and
``wrapper-sleep-raw`` (the sleep-mode engine: a colocated rank's). With such lengths a step's
generation is bound by its longest samples, a decode step at a time: ``ms_per_step`` is the time
over the longest sample's tokens. ``--mp`` builds standalone vLLM with its multiprocess engine core
(vLLM's default: the engine in a process of its own) instead of in this process, where the
trainer must run it:

    python benchmarks/rollout.py --lengths realistic --workloads 16x8x4096,32x8x4096 --max-model-len 4352 \
        --engines standalone,wrapper-raw,wrapper-sleep-raw --reps 1
    python benchmarks/rollout.py --lengths realistic ... --engines standalone,standalone-nolp --mp --name rollout_mp

    python benchmarks/rollout.py                 # GPU
    python benchmarks/rollout.py --size 0.5B --layers 2 --workloads 4x2x16 --reps 1   # CPU dry run

Rollout TP > 1 (under torchrun, vLLM's external launcher, as the trainer runs it): one engine
per process, so the wrapper and standalone vLLM are timed in two runs of the same command, and
``--compare`` prints their ratio from the two JSON files:

    torchrun --nproc_per_node=2 benchmarks/rollout.py --tp 2 --engines wrapper --name rollout_tp2_wrapper
    torchrun --nproc_per_node=2 benchmarks/rollout.py --tp 2 --engines standalone --name rollout_tp2_standalone
    python benchmarks/rollout.py --compare OUT/rollout_tp2_wrapper.json OUT/rollout_tp2_standalone.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import common  # noqa: E402
from grpo_step import length_sampler  # noqa: E402

import torch  # noqa: E402

if "--mp" not in sys.argv:  # (read by vLLM when an engine is built)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


# rows that call vllm.LLM.generate themselves, so can take one SamplingParams per request
PER_REQUEST = {"standalone", "standalone-nolp", "wrapper-raw", "wrapper-sleep-raw"}


def _held(params, max_tokens: int, k: int):
    """Request k of a realistic workload: `params` for one sample of `max_tokens` tokens, seed k."""
    p = params.clone()
    p.n, p.max_tokens, p.seed = 1, max_tokens, 1234 + k
    return p


def parse_workload(w: str, prompt_len: dict) -> dict:
    p, n, t = (int(x) for x in w.split("x"))
    return {"name": w, "prompts": p, "n": n, "max_tokens": t, "prompt_len": prompt_len.get(w, 64 if n == 1 else 128)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--workloads", default="64x1x256,32x8x512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gpu-mem", type=float, default=0.25)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (default on CPU)")
    ap.add_argument("--no-sleep-row", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tmp", default="/tmp/mcore_rl_bench")
    ap.add_argument("--tp", type=int, default=1, help="rollout TP (> 1: run under torchrun with that many processes)")
    ap.add_argument("--engines", default=None, help="comma list of wrapper, wrapper-raw, wrapper-seeded, standalone, "
                    "standalone-nolp, wrapper-sleep, wrapper-sleep-raw (default: wrapper, standalone, standalone-nolp, "
                    "wrapper-sleep at TP=1; TP>1 one engine per process)")
    ap.add_argument("--name", default=None, help="JSON name (default rollout, rollout_cpu on CPU)")
    ap.add_argument("--lengths", choices=("max", "realistic"), default="max",
                    help="max: every sample runs to max_tokens; realistic: per-sample lengths (see above)")
    ap.add_argument("--length-seed", type=int, default=0)
    ap.add_argument("--mp", action="store_true", help="standalone vLLM with its multiprocess engine core "
                    "(standalone rows only)")
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                    help="print A's tokens/s over B's per workload (two --engines runs) and exit")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    gpu = torch.cuda.is_available()
    eager = args.eager or not gpu
    rank = int(os.environ.get("RANK", "0"))
    if gpu and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if args.tp > 1 and int(os.environ.get("WORLD_SIZE", "1")) != args.tp:
        raise SystemExit(f"--tp {args.tp}: run under torchrun --nproc_per_node={args.tp}")
    wanted = set((args.engines or ("wrapper,standalone,standalone-nolp,wrapper-sleep" if args.tp == 1
                                   else "wrapper")).split(","))
    if args.tp > 1 and len(wanted & {"wrapper", "standalone", "wrapper-sleep"}) > 1:
        raise SystemExit("--tp > 1: one engine per process (--engines wrapper, or standalone[,standalone-nolp])")
    if args.lengths == "realistic" and not wanted <= PER_REQUEST:
        raise SystemExit(f"--lengths realistic: per-request lengths reach only {sorted(PER_REQUEST)}")
    if args.mp:
        if not wanted <= {"standalone", "standalone-nolp"}:
            raise SystemExit("--mp: standalone rows only (the wrapper runs vLLM in this process)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"

    import vllm

    from mcore_rl.rollout import Sampling, make_engine

    ceil = common.ceilings()
    cfg = common.qwen25_config(args.size, max_position_embeddings=args.max_model_len,
                               **({"num_hidden_layers": args.layers} if args.layers else {}))
    path = os.path.join(args.tmp, f"rollout-{args.size}-L{cfg['num_hidden_layers']}")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        common.write_hf_config_dir(path, cfg)
    while not os.path.exists(os.path.join(path, "config.json")):
        time.sleep(0.2)
    common_kw = dict(dtype="bfloat16", load_format="dummy", seed=0, max_model_len=args.max_model_len,
                     enforce_eager=eager, enable_prefix_caching=True, tensor_parallel_size=args.tp)
    gpu_kw = dict(gpu_memory_utilization=args.gpu_mem) if gpu else dict(kv_cache_memory_bytes=1 << 30)
    if args.tp > 1:
        gpu_kw["distributed_executor_backend"] = "external_launcher"  # what the wrapper uses under torchrun
    engines, start_s = {}, {}
    if wanted & {"wrapper", "wrapper-raw", "wrapper-seeded"}:
        t = time.perf_counter()
        engines["wrapper"] = make_engine("vllm", model_path=path, enable_sleep_mode=False, kv_cache_gib_cpu=1.0,
                                         **common_kw, **({"gpu_memory_utilization": args.gpu_mem} if gpu else {}))
        start_s["wrapper"] = time.perf_counter() - t
    if wanted & {"standalone", "standalone-nolp"}:
        t = time.perf_counter()
        engines["standalone"] = vllm.LLM(model=path, skip_tokenizer_init=True, logprobs_mode="raw_logprobs",
                                         **common_kw, **gpu_kw)
        start_s["standalone"] = time.perf_counter() - t
    errors = {}
    if gpu and not args.no_sleep_row and wanted & {"wrapper-sleep", "wrapper-sleep-raw"}:
        try:
            t = time.perf_counter()
            engines["wrapper-sleep"] = make_engine("vllm", model_path=path, gpu_memory_utilization=args.gpu_mem,
                                                   enable_sleep_mode=True, **common_kw)
            start_s["wrapper-sleep"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - report, keep the main comparison
            errors["wrapper-sleep"] = repr(e)[:500]
    print("engines up:", {k: round(v, 1) for k, v in start_s.items()}, errors, flush=True)

    rows = []
    for w in [parse_workload(x, {}) for x in args.workloads.split(",")]:
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 150000) for _ in range(w["prompt_len"])] for _ in range(w["prompts"])]
        sampling = Sampling(n=w["n"], temperature=1.0, max_tokens=w["max_tokens"], ignore_eos=True, logprobs=True)
        seeded = Sampling(n=w["n"], temperature=1.0, max_tokens=w["max_tokens"], ignore_eos=True, logprobs=True,
                          seed=1234)
        if "wrapper" in engines:
            params = engines["wrapper"]._params(sampling, 0)  # the exact SamplingParams the wrapper sends
        else:  # the same fields, written out (a standalone-only run at TP > 1)
            params = vllm.SamplingParams(n=w["n"], temperature=1.0, top_p=1.0, top_k=0, max_tokens=w["max_tokens"],
                                         ignore_eos=True, logprobs=0, detokenize=False, flat_logprobs=True)
        params_nolp = vllm.SamplingParams(n=w["n"], temperature=1.0, max_tokens=w["max_tokens"], ignore_eos=True,
                                          detokenize=False)
        tok_prompts = [{"prompt_token_ids": p} for p in prompts]
        want_tokens = w["prompts"] * w["n"] * w["max_tokens"]
        longest = w["max_tokens"]
        if args.lengths == "realistic":  # one request per sample, its own length and seed
            draw = length_sampler(w["max_tokens"], random.Random(args.length_seed))
            lengths = [draw() for _ in range(w["prompts"] * w["n"])]
            tok_prompts = [q for q in tok_prompts for _ in range(w["n"])]
            params, params_nolp = ([_held(p, n, k) for k, n in enumerate(lengths)] for p in (params, params_nolp))
            want_tokens, longest = sum(lengths), max(lengths)

        def run_wrapper(e):
            outs = e.generate(prompts, sampling)
            assert all(len(o.logprobs) == len(o.token_ids) for o in outs)
            return sum(len(o.token_ids) for o in outs)

        def run_standalone(p, llm=None):
            outs = (llm or engines["standalone"]).generate(tok_prompts, p, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        def run_seeded(e):
            outs = e.generate(prompts, seeded)
            return sum(len(o.token_ids) for o in outs)

        cases = {"wrapper": lambda: run_wrapper(engines["wrapper"]),
                 "standalone": lambda: run_standalone(params),
                 "standalone-nolp": lambda: run_standalone(params_nolp),
                 "wrapper-sleep": lambda: run_wrapper(engines["wrapper-sleep"]),
                 "wrapper-raw": lambda: run_standalone(params, engines["wrapper"].llm),
                 "wrapper-sleep-raw": lambda: run_standalone(params, engines["wrapper-sleep"].llm),
                 "wrapper-seeded": lambda: run_seeded(engines["wrapper"])}
        needs = {"standalone-nolp": "standalone", "wrapper-raw": "wrapper", "wrapper-seeded": "wrapper",
                 "wrapper-sleep-raw": "wrapper-sleep"}
        cases = {k: fn for k, fn in cases.items() if k in wanted and needs.get(k, k) in engines}
        times = {k: [] for k in cases}
        ntok = {}
        for k, fn in cases.items():  # warm-up (first batch of this shape)
            ntok[k] = fn()
        order = list(cases)
        for rep in range(args.reps):  # alternate, forward and backward, so drifts hit every case alike
            for k in (order if rep % 2 == 0 else order[::-1]):
                fn = cases[k]
                common.sync()
                t = time.perf_counter()
                n = fn()
                times[k].append(time.perf_counter() - t)
                assert n == ntok[k] == want_tokens, (k, n)
        ref = times.get("standalone")
        for k in cases:
            tps = ntok[k] / common.med(times[k])
            rows.append({"workload": w["name"], "engine": k + ("-mp" if args.mp else ""), "lengths": args.lengths,
                         "seconds": common.med(times[k]), "spread": [min(times[k]), max(times[k])],
                         "tokens": ntok[k], "tokens_per_s": tps, "ms_per_step": common.med(times[k]) / longest * 1e3,
                         "vs_standalone": tps * common.med(ref) / ntok[k] if ref else None,
                         "best_vs_best": min(ref) / min(times[k]) if ref else None, "all_s": times[k]})
            if rank == 0:
                print(rows[-1], flush=True)
    if rank != 0:
        return 0
    env = common.env_info()
    res = {"env": env, "ceilings": ceil, "size": args.size, "layers": cfg["num_hidden_layers"], "eager": eager,
           "engine_start_s": start_s, "errors": errors, "rows": rows}
    res["tp"] = args.tp
    out = common.save(args.name or ("rollout" + ("" if gpu else "_cpu")), res, args.out)
    print(f"\n{env['date']}  {env['device']}  torch {env['torch']}  vllm {env.get('vllm')}  "
          f"({'eager' if eager else 'CUDA graphs'}; {out})")
    print(common.table(rows, ["workload", "engine", "seconds", "tokens", "tokens_per_s", "ms_per_step", "vs_standalone",
                              "best_vs_best"],
                       f"rollout, Qwen2.5-{args.size}-shaped ({cfg['num_hidden_layers']} layers), random weights"))
    return 0


def compare(a: str, b: str) -> int:
    """Tokens/s of run A over run B, per workload (e.g. the wrapper over standalone vLLM at TP=2)."""
    import json

    ra, rb = (json.load(open(p)) for p in (a, b))
    tps = {(r["workload"]): r["tokens_per_s"] for r in rb["rows"] if r["engine"] == "standalone"}
    for r in ra["rows"]:
        if r["engine"] == "wrapper" and r["workload"] in tps:
            print(f"{r['workload']}: wrapper {r['tokens_per_s']:.0f} tok/s vs standalone {tps[r['workload']]:.0f} "
                  f"tok/s = {r['tokens_per_s'] / tps[r['workload']]:.3f} (rollout TP {ra.get('tp', 1)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
