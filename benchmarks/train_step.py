"""Megatron train step of a Qwen2.5-1.5B-shaped actor at sequence length 4096: tokens/s and MFU.

One step = `run_microbatches` (megatron's forward/backward schedule over the micro-batches,
local spec with SDPA core attention, TP-aware log-probs as the RL losses use them) +
megatron's optimizer step (Adam, bf16 params with fp32 master weights, grads reduced in
fp32), exactly as `mcore_rl.models.optim.wrap_for_training` sets it up for the trainer.
Random weights and random token ids.

Model FLOPs per token (what the step must compute, not what the kernels happen to do):
``6 * N_matmul + 6 * L * s * q_width`` where N_matmul counts every matmul weight (the tied
output projection included, the embedding lookup excluded) and the second term is causal
attention (QK^T and AV, half of the s x s square, x3 for forward + backward). MFU is reported
against the bf16 matmul rate measured in the same run, and against the 989 TFLOP/s datasheet
figure (H100 SXM dense bf16) for comparison with other reports.

``--logprob`` picks the log-prob loss: ``reference`` is `vocab_parallel_logprobs` (what the
trainer uses today), ``chunked`` / ``compiled`` are `ChunkedVocabLogprob` below (same values,
same TP reductions, no full-size fp32 temporaries; ``compiled`` fuses each chunk's math with
torch.compile). Measured on an H100 (2026-11-24, mbs 2 x 4 micro-batches x 4096): reference
1.06 s/step (41% of the measured matmul peak), chunked 1.03 s, compiled 0.93 s (46.6%).

    python benchmarks/train_step.py                      # GPU: 1.5B, seq 4096, mbs 1/2/4
    python benchmarks/train_step.py --mbs 2 --logprob reference,compiled
    python benchmarks/train_step.py --size 0.5B --layers 2 --seq 256 --mbs 1 --dtype fp32   # CPU dry run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import common  # noqa: E402

import torch  # noqa: E402

DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0}


def _fwd_chunk(xc, lt, owned):
    """Per-row max, sum of exp(x - max) and the target's logit, from one bf16 chunk (fp32 math)."""
    xf = xc.float()
    m = xf.amax(-1)
    se = (xf - m[:, None]).exp().sum(-1)
    picked = torch.where(owned, xf.gather(-1, lt[:, None])[:, 0], 0.0)
    return m, se, picked


def _bwd_chunk(xc, lse, g, lt, owned):
    """d/dx of sum(g * (x[target] - lse)) for one chunk: g * (onehot - softmax), in x's dtype."""
    p = (xc.float() - lse[:, None]).exp() * (-g[:, None])
    p = p.scatter_add(-1, lt[:, None], torch.where(owned, g, 0.0)[:, None])
    return p.to(xc.dtype)


_KERNELS = {"eager": (_fwd_chunk, _bwd_chunk)}


def _kernels(compiled: bool):
    key = "compiled" if compiled else "eager"
    if key not in _KERNELS:
        _KERNELS[key] = (torch.compile(_fwd_chunk, dynamic=False), torch.compile(_bwd_chunk, dynamic=False))
    return _KERNELS[key]


class ChunkedVocabLogprob(torch.autograd.Function):
    """log p(target) from vocab-parallel logits without full-size fp32 temporaries.

    A candidate for `mcore_rl.models.forward.vocab_parallel_logprobs` (same result, same TP
    reductions), measured here: the forward reads the bf16 logits once, chunk by chunk, in
    fp32 (online max / sum-exp, combined across TP with one MAX and two SUM all-reduces); the
    backward recomputes softmax chunk by chunk and writes the bf16 gradient directly. The
    reference implementation materialises ~5 fp32 copies of the [tokens, vocab] logits and
    keeps several for backward. Padded vocab columns (index >= vocab_size) get no probability
    and no gradient, as in the reference.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_size: int, chunk: int = 1024, compiled: bool = False):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        x = logits.reshape(-1, logits.size(-1))
        t = targets.reshape(-1)
        v_local = x.size(-1)
        start = ps.get_tensor_model_parallel_rank() * v_local
        valid = max(0, min(v_local, vocab_size - start))  # local columns that are real vocabulary
        n = x.size(0)
        f32 = dict(dtype=torch.float32, device=x.device)
        m, se, picked = torch.full((n,), float("-inf"), **f32), torch.zeros(n, **f32), torch.zeros(n, **f32)
        lt = t - start
        owned = (lt >= 0) & (lt < valid)
        lt = lt.clamp(0, max(valid - 1, 0))
        fwd, _ = _kernels(compiled)
        for i in range(0, n, chunk):
            if valid == 0:
                break
            m[i:i + chunk], se[i:i + chunk], picked[i:i + chunk] = fwd(x[i:i + chunk, :valid], lt[i:i + chunk],
                                                                     owned[i:i + chunk])
        if tp > 1:
            group = ps.get_tensor_model_parallel_group()
            gm = m.clone()
            dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
            se = torch.where(torch.isfinite(m), se * (m - gm).exp(), torch.zeros_like(se))
            dist.all_reduce(se, group=group)
            dist.all_reduce(picked, group=group)
            m = gm
        lse = m + se.log()
        ctx.save_for_backward(logits, t, lse)
        ctx.vocab_size, ctx.chunk, ctx.start, ctx.valid, ctx.compiled = vocab_size, chunk, start, valid, compiled
        return (picked - lse).view(targets.shape)

    @staticmethod
    def backward(ctx, g):
        logits, t, lse = ctx.saved_tensors
        x = logits.reshape(-1, logits.size(-1))
        g = g.reshape(-1).float()
        gx = torch.zeros_like(x)
        lt = t - ctx.start
        owned = (lt >= 0) & (lt < ctx.valid)
        lt = lt.clamp(0, max(ctx.valid - 1, 0))
        _, bwd = _kernels(ctx.compiled)
        for i in range(0, x.size(0), ctx.chunk):
            if ctx.valid == 0:
                break
            c = slice(i, i + ctx.chunk)
            gx[c, :ctx.valid] = bwd(x[c, :ctx.valid], lse[c], g[c], lt[c], owned[c])
        return gx.view_as(logits), None, None, None, None


def chunked_logprobs(logits, input_ids, vocab_size, compiled=False, chunk=1024):
    """Next-token log-probs [b, s-1] from full logits [b, s, V] (no slicing copy of the logits)."""
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)  # the last position is dropped below
    return ChunkedVocabLogprob.apply(logits, targets, vocab_size, chunk, compiled)[:, :-1]


def model_flops_per_token(spec, seq: int) -> tuple[float, int]:
    h, f, L, V = spec.hidden_size, spec.ffn_hidden_size, spec.num_layers, spec.vocab_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_query_groups * spec.head_dim
    n_matmul = L * (h * (q + 2 * kv) + q * h + 3 * h * f) + V * h
    return 6.0 * n_matmul + 6.0 * L * seq * q, n_matmul


def run(args) -> dict:
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.models.forward import run_microbatches, vocab_parallel_logprobs
    from mcore_rl.models.optim import wrap_for_training, zero_grads

    init_distributed(1, 1)
    gpu = torch.cuda.is_available()
    ceil = common.ceilings()
    cfg = common.qwen25_config(args.size, max_position_embeddings=max(4096, args.seq),
                               **({"num_hidden_layers": args.layers} if args.layers else {}))
    path = common.write_hf_config_dir(os.path.join(args.tmp, f"train-{args.size}"), cfg)
    spec = arch_from_hf_config(path)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    model = build_model(spec, dtype=dtype, perform_initialization=False, use_cpu_initialization=not gpu)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    ddp, opt = wrap_for_training(model, lr=1e-6)
    build_s = time.perf_counter() - t0
    fpt, n_matmul = model_flops_per_token(spec, args.seq)
    dev = next(model.parameters()).device
    V = spec.vocab_size

    def loss_ref(logits, mb):
        logp, _ = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:], V)
        loss = -logp.mean() / mb["n"]
        return loss, {"loss": loss.detach()}

    def loss_chunked(logits, mb):
        loss = -chunked_logprobs(logits, mb["input_ids"], V).mean() / mb["n"]
        return loss, {"loss": loss.detach()}

    def loss_compiled(logits, mb):
        loss = -chunked_logprobs(logits, mb["input_ids"], V, compiled=True).mean() / mb["n"]
        return loss, {"loss": loss.detach()}

    rows, best = [], None
    variants = {"reference": loss_ref, "chunked": loss_chunked, "compiled": loss_compiled}
    configs = [(lp, int(x)) for lp in (list(variants) if args.logprob == "all" else args.logprob.split(","))
               for x in args.mbs.split(",")]
    oom_at = {}
    for logprob, mbs in configs:
        if mbs >= oom_at.get(logprob, 1 << 30):
            continue
        loss_fn = variants[logprob]
        n_mb = max(1, args.tokens_per_step // (mbs * args.seq))
        gen = torch.Generator(device=dev).manual_seed(mbs)
        batches = [{"input_ids": torch.randint(0, V, (mbs, args.seq), device=dev, generator=gen), "n": n_mb}
                   for _ in range(n_mb)]

        def step():
            zero_grads(ddp, opt)
            out = run_microbatches(ddp, batches, loss_fn)
            ok, gnorm, _ = opt.step()
            return out, ok, gnorm

        try:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            out, ok, gnorm = step()
            assert ok and gnorm is not None and torch.isfinite(torch.tensor(float(gnorm))), (ok, gnorm)
            ts = common.time_fn(step, reps=args.reps, warmup=1)
        except torch.OutOfMemoryError as e:
            rows.append({"logprob": logprob, "mbs": mbs, "n_mb": n_mb, "error": "OOM"})
            print(f"{logprob} mbs={mbs}: OOM ({str(e)[:120]})", flush=True)
            del e
            oom_at[logprob] = mbs
            zero_grads(ddp, opt)
            torch.cuda.empty_cache()
            continue
        tokens = mbs * args.seq * n_mb
        sec = common.med(ts)
        tflops = fpt * tokens / sec / 1e12
        row = {"logprob": logprob, "mbs": mbs, "n_mb": n_mb, "seq": args.seq, "tokens": tokens, "step_s": sec,
               "spread": [min(ts), max(ts)], "tokens_per_s": tokens / sec, "model_TFLOPs": tflops,
               "MFU_measured": tflops / ceil["matmul_TFLOPs"], "loss": float(out[0]["loss"]) * n_mb,
               "grad_norm": float(gnorm)}
        name = torch.cuda.get_device_name() if gpu else ""
        peak = next((v for k, v in DATASHEET_TFLOPS.items() if k in name), None)
        if peak:
            row["MFU_datasheet"] = tflops / peak
        if gpu:
            row["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(row, flush=True)
        if logprob == "reference" and (best is None or row["tokens_per_s"] > best[0]["tokens_per_s"]):
            best = (row, batches)
        del batches
        if gpu:
            torch.cuda.empty_cache()
    breakdown = {}
    if best is not None and not args.no_breakdown:  # where the step's time goes, at the best micro-batch size
        row, batches = best

        def simple_loss(logits, mb):  # same forward/backward minus the fp32 log-softmax over the vocab
            loss = logits.sum() * 1e-9
            return loss, {"loss": loss.detach()}

        def fwd_bwd(fn):
            def f():
                zero_grads(ddp, opt)
                run_microbatches(ddp, batches, fn)
            return f

        reps = max(2, args.reps // 2)
        breakdown["fwd_bwd_logprob_s"] = common.med(common.time_fn(fwd_bwd(loss_ref), reps=reps, warmup=1))
        breakdown["fwd_bwd_sumloss_s"] = common.med(common.time_fn(fwd_bwd(simple_loss), reps=reps, warmup=1))
        breakdown["optimizer_step_s"] = common.med(common.time_fn(opt.step, reps=reps, warmup=1))
        breakdown["mbs"] = row["mbs"]
        tokens = row["tokens"]
        breakdown["fwd_bwd_logprob_MFU_measured"] = fpt * tokens / breakdown["fwd_bwd_logprob_s"] / 1e12 / ceil["matmul_TFLOPs"]
        breakdown["fwd_bwd_sumloss_MFU_measured"] = fpt * tokens / breakdown["fwd_bwd_sumloss_s"] / 1e12 / ceil["matmul_TFLOPs"]
        print("breakdown:", breakdown, flush=True)
    return {"env": common.env_info(), "ceilings": ceil, "size": args.size, "layers": spec.num_layers,
            "params": spec.num_params(), "n_matmul": n_matmul, "flops_per_token": fpt, "dtype": args.dtype,
            "build_s": build_s, "rows": rows, "breakdown": breakdown}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mbs", default="1,2,4", help="micro-batch sizes to try, in order (stops at the first OOM)")
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--logprob", default="reference",
                    help="comma list of log-prob losses, or 'all': reference (vocab_parallel_logprobs, what the "
                         "trainer uses), chunked (ChunkedVocabLogprob, eager torch), compiled (its chunk math "
                         "through torch.compile)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tmp", default="/tmp/mcore_rl_bench")
    args = ap.parse_args(argv)
    res = run(args)
    path = common.save("train_step" + ("" if torch.cuda.is_available() else "_cpu"), res, args.out)
    e, c = res["env"], res["ceilings"]
    print(f"\n{e['date']}  {e['device']}  torch {e['torch']}  megatron-core {e.get('megatron_core')}  "
          f"copy {c['copy_GBps']:.0f} GB/s  matmul {c['matmul_TFLOPs']:.1f} TFLOP/s  ({path})")
    print(f"Qwen2.5-{args.size}-shaped, {res['params'] / 1e9:.3f}B params, {res['layers']} layers, "
          f"{res['flops_per_token'] / 1e9:.2f} GFLOP/token at seq {args.seq}")
    print(common.table(res["rows"], ["logprob", "mbs", "n_mb", "tokens", "step_s", "tokens_per_s", "model_TFLOPs",
                                     "MFU_measured", "MFU_datasheet", "peak_mem_GiB"], "train step"))
    if res["breakdown"]:
        b = res["breakdown"]
        print(f"breakdown at mbs={b['mbs']}: fwd+bwd (log-prob loss) {b['fwd_bwd_logprob_s']:.3f} s, "
              f"fwd+bwd (sum loss) {b['fwd_bwd_sumloss_s']:.3f} s, optimizer step {b['optimizer_step_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
