"""Conversion throughput and peak memory: a random ~1B Llama-shaped HF checkpoint (bf16) ->
megatron dist_checkpointing -> HF, on this machine's CPU. Prints a table, writes JSON.

    python benchmarks/convert.py [--layers 16] [--out-json convert.json]
"""

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import torch


def write_random_llama(path: str, layers: int) -> int:
    """A Llama-3.2-1B-shaped checkpoint (hidden 2048, 32 heads / 8 kv, ffn 8192, vocab 128256),
    written tensor by tensor so the writer itself stays small."""
    from converters.hf_io import HFWriter
    from mcore_rl.models.arch import arch_from_hf_config

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, dtype="bfloat16",
               rope_theta=500000.0)
    os.makedirs(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    spec = arch_from_hf_config(cfg)
    from converters.mapping import NameIndex

    g = torch.Generator().manual_seed(0)
    writer = HFWriter(path, shard_mb=1024)
    shapes = _hf_shapes(spec)
    for name in NameIndex(spec).all_hf_names():
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--out-json", default="convert.json")
    args = ap.parse_args()
    from converters.checkpoint import hf_to_mcore, mcore_to_hf

    tmp = tempfile.mkdtemp(prefix="mcore_rl_convert_bench_")
    try:
        src = os.path.join(tmp, "hf")
        nbytes = write_random_llama(src, args.layers)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t = time.perf_counter()
        hf_to_mcore(src, os.path.join(tmp, "m"))
        t_in = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        t = time.perf_counter()
        mcore_to_hf(os.path.join(tmp, "m"), os.path.join(tmp, "back"))
        t_out = time.perf_counter() - t
        rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows = [("hf-to-mcore", t_in, nbytes / t_in / 1e9, rss1), ("mcore-to-hf", t_out, nbytes / t_out / 1e9, rss2)]
        print(f"model: {nbytes / 1e9:.2f} GB bf16 ({args.layers} layers, Llama-3.2-1B shape); "
              f"peak RSS before converting {rss0:.2f} GiB")
        print(f"{'direction':<12} {'seconds':>8} {'GB/s':>6} {'peak RSS GiB (process so far)':>30}")
        for name, s, gbps, rss in rows:
            print(f"{name:<12} {s:>8.1f} {gbps:>6.2f} {rss:>30.2f}")
        json.dump({"model_bytes": nbytes, "layers": args.layers, "rss_before_gib": rss0,
                   "results": [dict(zip(("direction", "seconds", "GBps", "peak_rss_gib"), r)) for r in rows]},
                  open(args.out_json, "w"), indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
