"""Weight sync benchmark: Megatron actor -> in-process vLLM engine, HF-named path vs fast path.

For random Qwen2.5-{0.5B,1.5B,7B}-shaped bf16 models (public shapes, random weights; vLLM
starts with ``load_format="dummy"``, so nothing is read from disk):

* ``hf``: ``engine.update_weights(Resharder.load_hf)`` (gather -> HF names -> vLLM
  ``load_weights``), the general path; ``gather`` times its first half alone.
* ``fast-graph`` / ``fast-hybrid`` / ``fast-foreach`` / ``fast-loop``:
  `mcore_rl.resharding.fast_path.FastSync` (precomputed copies into vLLM's fused parameters;
  the modes differ only in how the copies are issued), GPU only, checked bit for bit against
  the HF path before it is timed. ``device_s`` is the copies' CUDA-event time alone.

Bytes are per rank: what one sync writes into this rank's vLLM shard (the fast plan's bytes;
at TP=1 the model's HF bytes; at TP=2 half of the TP-split tensors plus the replicated norms,
``bytes_per_rank``; the whole model's HF bytes are ``bytes_model``). Ranks copy concurrently, so
the floor is one read and one write of the largest rank's bytes at the measured device copy
bandwidth (`common.ceilings`, read + write counted): ``floor_s = 2 * bytes / copy_GBps``; a
row's ``seconds`` is the slowest rank's median, ``GBps`` the per-rank bytes over it.

    python benchmarks/sync.py                        # GPU: 0.5B, 1.5B, 7B; CPU: 0.5B, 1.5B
    python benchmarks/sync.py --sizes 0.5B --tp 2    # 2 local processes (gloo on CPU)
    python benchmarks/sync.py --check-fast-path      # fast path vs vLLM's own loaders, tiny models, CPU or GPU

Each size runs in its own process (a fresh vLLM engine); results go to $OUT/sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import common  # noqa: E402

import torch  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args):
    """fn(*args) on `world` local processes (env:// rendezvous); returns every rank's result."""
    import torch.multiprocessing as mp

    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(world, port, d, fn, args), nprocs=world, start_method="spawn")
        return [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(world)]


def _entry(rank, world, port, d, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        os.environ.setdefault("VLLM_DIST_IDENT", f"mcore-rl-{port}")  # vLLM's CPU communicator wants it
    res = fn(*args)
    json.dump(res, open(os.path.join(d, f"rank{rank}.json"), "w"), default=str)


def random_actor(spec, dtype, seed=0):
    """The actor as the trainer builds it, with random N(0, 0.02) weights drawn on the device."""
    from mcore_rl.models.build import build_model

    gpu = torch.cuda.is_available()
    model = build_model(spec, dtype=dtype, perform_initialization=False, use_cpu_initialization=not gpu)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def rank_shard_numel(model) -> int:
    """Elements a sync writes into this rank's rollout shard (same TP as training): every
    TP-split tensor's local shard, replicated tensors (norms) whole, the vocabulary shards
    without their padding rows; the tied output layer is the embedding. The fast plan writes
    exactly these (`fast_path.CopyProgram.nbytes` / element size)."""
    from megatron.core import parallel_state as ps

    from converters.mapping import NameIndex

    inner = model.module if hasattr(model, "module") else model
    spec = inner.mcore_rl_spec
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    index = NameIndex(spec)
    total = 0
    for name, p in inner.named_parameters():
        if name == "output_layer.weight" and spec.tied_embeddings:
            continue
        rule, _ = index.mcore(name)
        if rule.kind == "vocab":
            rows = spec.padded_vocab_size // tp
            valid = min(max(spec.vocab_size - tp_rank * rows, 0), rows)
            total += valid * (p.numel() // p.shape[0])
        else:
            total += p.numel()
    return total


def rank_shard_bytes(model) -> int:
    """`rank_shard_numel` in the actor's dtype (the engine's, in this benchmark)."""
    return rank_shard_numel(model) * next(model.parameters()).element_size()


def plan_numel(plan) -> int:
    return sum(d.numel() for d, _ in plan.copies) + sum(d.numel() for d, _, _ in plan.gathers)


# ------------------------------------------------------------------------------------ timing
def bench_size(size: str, args) -> dict:
    from megatron.core import parallel_state as ps

    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.resharding import Resharder
    from converters.gather import iter_hf_tensors
    from mcore_rl.rollout import make_engine

    tp = args.tp
    init_distributed(tp, 1)
    rank = torch.distributed.get_rank()
    gpu = torch.cuda.is_available()
    ceil = common.ceilings()
    cfg = common.qwen25_config(size, max_position_embeddings=args.max_model_len, **(
        {"num_hidden_layers": args.layers} if args.layers else {}))
    path = os.path.join(args.tmp, f"qwen25-{size}-L{cfg['num_hidden_layers']}")
    if rank == 0:
        common.write_hf_config_dir(path, cfg)
    torch.distributed.barrier()
    spec = arch_from_hf_config(path)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    model = random_actor(spec, dtype)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = make_engine("vllm", model_path=path, dtype="bfloat16", load_format="dummy", tensor_parallel_size=tp,
                         gpu_memory_utilization=args.gpu_mem, max_model_len=args.max_model_len,
                         enforce_eager=True, kv_cache_gib_cpu=0.25, seed=0)
    engine_s = time.perf_counter() - t0
    res = {"size": size, "params": spec.num_params(), "layers": spec.num_layers, "tp": tp, "dtype": "bf16",
           "build_s": build_s, "engine_start_s": engine_s, "ceilings": ceil, "reload_mode": engine.reload_mode}
    floor = lambda nbytes: 2 * nbytes / (ceil["copy_GBps"] * 1e9)  # noqa: E731
    world = torch.distributed.get_world_size()

    def all_ranks(obj):
        got = [None] * world
        torch.distributed.all_gather_object(got, obj)
        return got

    # gather alone (what the HF path does before vLLM sees a tensor)
    def gather():
        n = 0
        for _, t in iter_hf_tensors(model):
            n += t.numel() * t.element_size()
        common.sync()
        return n

    reps = args.reps if gpu else max(1, args.reps // 5)
    nbytes = gather()  # the whole model's HF tensors: every rank gathers all of them
    # what a sync writes into this rank's vLLM shard (== the fast plan's bytes); each rank copies
    # its own shard concurrently, so the floor is that of the largest rank's bytes
    rank_nbytes = rank_shard_bytes(model)
    res["bytes_model"], res["bytes_per_rank"] = nbytes, all_ranks(rank_nbytes)
    rank_max = max(res["bytes_per_rank"])
    ts = []
    for _ in range(reps):
        common.sync()
        t = time.perf_counter()
        gather()
        ts.append(time.perf_counter() - t)
    rows = [{"path": "gather only", "seconds": common.med(ts)}]

    resharder = Resharder(model, bucket_mb=args.bucket_mb)
    stats = [engine.update_weights(resharder.load_hf) for _ in range(reps + 1)][1:]
    rows.append({"path": "hf (Resharder)", "seconds": common.med(s["sync/seconds"] for s in stats),
                 "spread": [min(s["sync/seconds"] for s in stats), max(s["sync/seconds"] for s in stats)]})
    res["bytes"] = rank_max
    res["hf_tensors"] = stats[0]["sync/tensors"]

    if gpu and not args.no_fast:
        sys.path.insert(0, os.path.join(common.REPO, "tests"))
        from fast_path_oracle import check_against_hf_path

        from mcore_rl.resharding.fast_path import FastSync, NotApplicable

        fast, target = None, engine.weight_target()
        why = target.why_not_copy
        try:
            fast = FastSync(model, target.copy_slots(), mode="graph") if why is None else None
        except NotApplicable as e:
            why = str(e)
        # every rank takes the same branch: the check below runs the HF path's collectives
        whys = all_ranks(why)
        why = next((f"rank {r}: {w}" for r, w in enumerate(whys) if w is not None), None)
        if why is not None:
            res["fast_not_applicable"] = why
        else:
            res["fast_plan_s"] = fast.build_seconds
            res["fast_plan_copies"] = [len(fast.program.copies), len(fast.program.gathers), len(fast.program.zeros)]
            res["fast_plan_bytes_per_rank"] = all_ranks(fast.program.nbytes)
            if not args.skip_check:
                bad = check_against_hf_path(engine, resharder, fast)
                bads = all_ranks(bad[:10])
                res["fast_bit_exact"] = not any(bads)
                res["fast_mismatch"] = {r: b for r, b in enumerate(bads) if b}
                torch.cuda.empty_cache()
            # like with like: the plan writes this rank's shard, not the model
            assert res["fast_plan_bytes_per_rank"] == res["bytes_per_rank"], (res["fast_plan_bytes_per_rank"],
                                                                            res["bytes_per_rank"])
            for mode in ("graph", "hybrid", "foreach", "loop"):
                torch.distributed.barrier()  # before any `continue`: every rank passes the same barriers
                if mode == "graph" and fast.mode != "graph":
                    res["fast_graph_error"] = fast.graph_error
                    continue
                fast.mode = mode
                st = [fast.sync() for _ in range(args.reps * 4 + 2)][2:]
                ev = common.time_fn(fast.copy, reps=args.reps * 4, warmup=2)  # device time of the copies alone
                rows.append({"path": f"fast-{mode}", "seconds": common.med(s["sync/seconds"] for s in st),
                             "device_s": common.med(ev),
                             "spread": [min(s["sync/seconds"] for s in st), max(s["sync/seconds"] for s in st)]})
    # the slowest rank's median sets the sync time (ranks sync concurrently)
    per_rank = all_ranks({r["path"]: r["seconds"] for r in rows})
    for r in rows:
        r["size"] = size
        r["seconds_per_rank"] = [x.get(r["path"]) for x in per_rank]
        r["seconds"] = max(x for x in r["seconds_per_rank"] if x is not None)
        r["GBps"] = rank_max / r["seconds"] / 1e9  # per rank (each GPU moves its own shard)
        r["x_floor"] = r["seconds"] / floor(rank_max)
    res["floor_s"] = floor(rank_max)
    res["rows"] = rows
    # sanity: the engine still generates after the syncs
    from mcore_rl.rollout import Sampling

    out = engine.generate([[1, 2, 3, 4]], Sampling(temperature=0, max_tokens=4))
    res["generate_ok"] = len(out[0].token_ids) == 4
    engine.close()
    return res


def run_one(size: str, args) -> dict:
    if args.tp > 1:
        return _spawn(bench_size, args.tp, size, args)[0]
    return bench_size(size, args)


# ------------------------------------------------------------ fast path vs vLLM's loaders
def check_fast_path(arch: str, tp: int, tmp: str) -> dict:
    """Build a real vLLM model object (no engine) under vLLM's TP groups, load it through
    vLLM's own `load_weights` from the HF-named gather, then scramble it and write it with the
    fast-path plan: every parameter must be bit-identical. Runs on CPU (gloo) too, because
    the model is never run (CPU engines repack their weights; this object is not repacked)."""
    sys.path.insert(0, os.path.join(common.REPO, "tests"))
    from conftest import make_tiny_hf_model
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import get_model_architecture

    from converters.hf_io import load_hf_into_model
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from fast_path_oracle import compare, snapshot

    from mcore_rl.resharding.fast_path import build_program, run_program
    from mcore_rl.rollout.vllm_engine import copy_slots
    from converters.gather import iter_hf_tensors

    init_distributed(tp, 1)
    rank = torch.distributed.get_rank()
    path = os.path.join(tmp, f"fastcheck-{arch}")
    # vocab 1000: Megatron pads to 1024 (128), vLLM to 1024 (64) at TP 1/2; 4 heads / 2 kv groups
    if rank == 0:
        make_tiny_hf_model(path, arch, vocab_size=1000, dtype=torch.bfloat16, max_position_embeddings=256)
    torch.distributed.barrier()
    spec = arch_from_hf_config(path)
    model = build_model(spec, dtype=torch.bfloat16)
    load_hf_into_model(model, spec, path)
    torch.manual_seed(123)  # same stream on every rank: replicated tensors (norms) stay equal across TP, as in training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained": differs from the checkpoint
    cfg = EngineArgs(model=path, dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
                     tensor_parallel_size=tp, max_model_len=256,
                     distributed_executor_backend="external_launcher" if tp > 1 else None).create_engine_config()
    cls, _ = get_model_architecture(cfg.model_config)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with set_current_vllm_config(cfg):
        init_distributed_environment(tp, rank, "env://", rank, "nccl" if torch.cuda.is_available() else "gloo")
        ensure_model_parallel_initialized(tp, 1)
        with dev:
            vm = cls(vllm_config=cfg, prefix="")
    with torch.no_grad():
        vm.load_weights(iter_hf_tensors(model))  # vLLM's own loaders: the oracle
    ref = snapshot(dict(vm.named_parameters()))
    plan = build_program(model, copy_slots(vm))
    rank_numel = rank_shard_numel(model)
    bad = {}
    for mode in ("hybrid", "foreach", "loop"):
        with torch.no_grad():
            for p in vm.parameters():
                p.data.normal_()
        run_program(plan, mode)
        bad[mode] = compare(ref, dict(vm.named_parameters()))
    return {"arch": arch, "tp": tp, "rank": rank, "params": len(ref), "copies": len(plan.copies),
            "gathers": len(plan.gathers), "zeros": len(plan.zeros), "mismatch": bad,
            "plan_numel": plan_numel(plan), "rank_numel": rank_numel, "shard_match": plan_numel(plan) == rank_numel,
            "bit_exact": not any(bad.values())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=None, help="comma list of 0.5B,1.5B,3B,7B (default GPU: 0.5B,1.5B,7B; CPU: 0.5B,1.5B)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (smaller CPU runs)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--gpu-mem", type=float, default=0.35)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-fast", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-fast-path", action="store_true")
    ap.add_argument("--archs", default="qwen2,llama,qwen3")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child mode: one size, JSON on stdout
    ap.add_argument("--out", default=None)
    ap.add_argument("--tmp", default=os.path.join(tempfile.gettempdir(), "mcore_rl_bench"))
    args = ap.parse_args(argv)
    os.makedirs(args.tmp, exist_ok=True)
    gpu = torch.cuda.is_available()

    if args.check_fast_path:
        rows = []
        for arch in args.archs.split(","):
            rs = _spawn(check_fast_path, args.tp, arch, args.tp, args.tmp) if args.tp > 1 else [check_fast_path(arch, 1, args.tmp)]
            rows += rs
            for r in rs:
                print(json.dumps(r), flush=True)
        print(common.table(rows, ["arch", "tp", "rank", "params", "copies", "gathers", "zeros", "plan_numel",
                                  "shard_match", "bit_exact"], "fast path vs vLLM load_weights (bit for bit)"))
        common.save(f"fastpath_check_tp{args.tp}", {"env": common.env_info(), "rows": rows}, args.out)
        return 0 if all(r["bit_exact"] and r["shard_match"] for r in rows) else 1

    sizes = (args.sizes or ("0.5B,1.5B,7B" if gpu else "0.5B,1.5B")).split(",")
    if args.one:
        res = run_one(sizes[0], args)
        print("@@RESULT@@" + json.dumps(res, default=str), flush=True)
        return 0
    results = []
    for size in sizes:  # one process per size: a fresh engine, memory returned in between
        rest, skip = [], False
        for a in (argv if argv is not None else sys.argv[1:]):
            if skip or a.startswith("--sizes"):
                skip = a == "--sizes"
                continue
            rest.append(a)
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--sizes", size] + rest
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("@@RESULT@@")]
        if p.returncode or not line:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
            results.append({"size": size, "error": f"exit {p.returncode}", "stderr_tail": p.stderr[-2000:]})
            continue
        r = json.loads(line[0][len("@@RESULT@@"):])
        r["process_s"] = time.perf_counter() - t
        results.append(r)
        print(f"{size}: done in {r['process_s']:.0f} s", flush=True)
    env = common.env_info()
    rows = [row for r in results for row in r.get("rows", [])]
    common.save(f"sync_tp{args.tp}" + ("_cpu" if not gpu else ""), {"env": env, "results": results}, args.out)
    c = next((r["ceilings"] for r in results if "ceilings" in r), {})
    print(f"\n{env['date']}  {env['device']}  torch {env['torch']}  megatron-core {env.get('megatron_core')}  "
          f"vllm {env.get('vllm')}  copy {c.get('copy_GBps', 0):.0f} GB/s (r+w)  "
          f"matmul {c.get('matmul_TFLOPs', 0):.1f} TFLOP/s")
    for r in results:
        if "error" in r:
            print(f"{r['size']}: ERROR {r['error']}")
        else:
            per_rank = r.get("bytes_per_rank", [r["bytes"]])
            print(f"{r['size']}: {r['params'] / 1e9:.2f}B params, {r.get('bytes_model', r['bytes']) / 2**30:.2f} GiB "
                  f"({r['hf_tensors']} HF tensors), TP={r['tp']}: per rank "
                  f"{', '.join(f'{b / 2**30:.3f}' for b in per_rank)} GiB, floor of the per-rank bytes "
                  f"{r['floor_s'] * 1e3:.2f} ms, fast path bit-exact: {r.get('fast_bit_exact', 'n/a')}"
                  + (f" ({r['fast_not_applicable']})" if "fast_not_applicable" in r else ""))
    print(common.table(rows, ["size", "path", "seconds", "device_s", "GBps", "x_floor"], f"weight sync, TP={args.tp}"))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
