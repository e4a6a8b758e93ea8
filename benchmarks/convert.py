"""Conversion throughput and peak memory: a random ~1B Llama-shaped HF checkpoint (bf16) ->
megatron dist_checkpointing -> HF, on this machine's CPU. Each direction runs in a fresh
process, so its peak RSS is its own; the RSS of such a process right after importing torch,
megatron-core and the converter is reported as the baseline. Prints a table, writes JSON.

    python benchmarks/convert.py [--layers 16] [--tp 1] [--out-json convert.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs one direction in a child process and prints one JSON line: wall seconds, the RSS after
# imports, the peak RSS (the kernel's high-water mark, VmHWM).
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch, megatron.core.dist_checkpointing, megatron.core.models.gpt, mcore_rl.models.build, tqdm
import converters.checkpoint as c, converters.streaming
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":"))) * 1024
rss0 = status("VmRSS")
t = time.perf_counter()
if {direction!r} == "hf-to-mcore":
    c.hf_to_mcore({src!r}, {dst!r}, progress=False)
else:
    c.mcore_to_hf({src!r}, {dst!r}, progress=False)
print("RESULT " + json.dumps(dict(seconds=time.perf_counter() - t, rss_after_import=rss0, peak_rss=status("VmHWM"))))
"""


def write_random_llama(path: str, layers: int) -> int:
    """A Llama-3.2-1B-shaped checkpoint (hidden 2048, 32 heads / 8 kv, ffn 8192, vocab 128256),
    written tensor by tensor so the writer itself stays small."""
    from converters.hf_io import HFWriter
    from converters.mapping import NameIndex
    from mcore_rl.models.arch import arch_from_hf_config

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, dtype="bfloat16",
               rope_theta=500000.0)
    os.makedirs(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    spec = arch_from_hf_config(cfg)
    g = torch.Generator().manual_seed(0)
    shapes = _hf_shapes(spec)
    names = NameIndex(spec).all_hf_names()
    writer = HFWriter(path, shard_mb=1024, tensors=[(n, shapes(n), torch.bfloat16) for n in names])
    for name in names:
        writer.add(name, (torch.randn(shapes(name), generator=g) * 0.02).to(torch.bfloat16))
    writer.close()
    return writer.total


def _hf_shapes(spec):
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d

    def shape(name):
        if "embed_tokens" in name or name == "lm_head.weight":
            return (spec.vocab_size, h)
        if name.endswith("norm.weight"):
            return (h,)
        for key, s in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q)),
                       ("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
            if key in name:
                return s
        raise KeyError(name)

    return shape


def run_direction(direction: str, src: str, dst: str) -> dict:
    code = CHILD.format(root=ROOT, direction=direction, src=src, dst=dst)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{direction} failed:\n{r.stderr[-3000:]}")
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


def same_tensors(a: str, b: str) -> bool:
    from converters.hf_io import HFReader

    ra, rb = HFReader(a), HFReader(b)
    return set(ra.keys()) == set(rb.keys()) and all(torch.equal(ra.get(k), rb.get(k)) for k in ra.keys())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out-json", default="convert.json")
    ap.add_argument("--tmp", default=None, help="where to put the checkpoints (default: a temp dir)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)

    tmp = tempfile.mkdtemp(prefix="mcore_rl_convert_bench_", dir=args.tmp)
    try:
        src, mid, back = (os.path.join(tmp, n) for n in ("hf", "m", "back"))
        nbytes = write_random_llama(src, args.layers)
        rows = []
        for direction, a, b in (("hf-to-mcore", src, mid), ("mcore-to-hf", mid, back)):
            load = os.getloadavg()[0]  # the machine may be shared: times are only as quiet as it was
            r = run_direction(direction, a, b)
            rows.append(dict(direction=direction, seconds=r["seconds"], GBps=nbytes / r["seconds"] / 1e9,
                             peak_rss_gib=r["peak_rss"] / 2**30, rss_after_import_gib=r["rss_after_import"] / 2**30,
                             load_avg_before=load))
        exact = same_tensors(src, back)
        print(f"model: {nbytes / 1e9:.2f} GB bf16 ({args.layers} layers, Llama-3.2-1B shape); "
              f"round trip bit-exact: {exact}")
        print(f"{'direction':<12} {'seconds':>8} {'GB/s':>6} {'peak RSS GiB':>13} {'RSS after imports GiB':>22}")
        for r in rows:
            print(f"{r['direction']:<12} {r['seconds']:>8.1f} {r['GBps']:>6.2f} {r['peak_rss_gib']:>13.2f} "
                  f"{r['rss_after_import_gib']:>22.2f}")
        json.dump({"date": time.strftime("%Y-%m-%d"), "model_bytes": nbytes, "layers": args.layers, "bit_exact": exact,
                   "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": rows},
                  open(args.out_json, "w"), indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
