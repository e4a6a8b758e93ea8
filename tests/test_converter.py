"""Converter: HF -> Megatron -> HF round trips bit for bit, checkpoints reshard, bad input
is refused with a clear message before any work starts."""

import glob
import json
import os
import subprocess
import sys

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_hf_model
from dist_utils import in_turn, run_ranks, selected

pytestmark = pytest.mark.convert


def _tensors(path):
    out = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        out.update(load_file(f))
    return out


def _convert_worker(hf_path, out, tp, pp):
    from converters.checkpoint import hf_to_mcore

    hf_to_mcore(hf_path, out, tp=tp, pp=pp)


def _export_worker(mcore_path, out):
    from converters.checkpoint import mcore_to_hf

    mcore_to_hf(mcore_path, out)


def _assert_bit_exact(a_path, b_path):
    a, b = _tensors(a_path), _tensors(b_path)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def round_trips(request, tmp_path_factory):
    """{case id: (HF source, work dir)} of the selected cases, each converted to Megatron at its layout
    (m/) and exported back (h/). The 2-rank conversions share one pair of processes; the 1-rank
    conversions and all exports then share one process."""
    cases = selected(request, "test_round_trip_bit_exact")
    out = {}
    for c, p in cases.items():
        tmp = tmp_path_factory.mktemp(f"round_trip_{c}")
        out[c] = (make_tiny_hf_model(tmp / "src", p["arch"], dtype=torch.bfloat16), tmp)
    for world in (2, 1):
        calls = {("convert", c): (_convert_worker, (out[c][0], str(out[c][1] / "m"), p["tp"], p["pp"]))
                 for c, p in cases.items() if p["tp"] * p["pp"] == world}
        if world == 1:
            calls.update({("export", c): (_export_worker, (str(out[c][1] / "m"), str(out[c][1] / "h"))) for c in cases})
        if calls:
            run_ranks(in_turn, world, calls)
    return out


@pytest.mark.parametrize("arch,tp,pp", [("llama", 1, 1), ("llama", 2, 1), ("qwen2", 1, 2), ("opt", 2, 1)])
def test_round_trip_bit_exact(arch, tp, pp, round_trips, request):
    src, tmp_path = round_trips[request.node.callspec.id]
    meta = json.load(open(tmp_path / "m" / "mcore_rl.json"))
    assert meta["dtype"] == "bfloat16" and meta["written_at"] == {"tp": tp, "pp": pp}
    _assert_bit_exact(src, tmp_path / "h")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # staging dirs are gone


def _streamed_and_megatron_saved_worker(hf_path, streamed, saved):
    """The same TP=2 shards written by the streaming converter and by megatron's own writer,
    then read back tensor by tensor from both; returns the tensors that differ, their number
    and the processes the save left running."""
    from converters.checkpoint import export_order, hf_to_mcore, save_model
    from converters.hf_io import load_hf_into_model
    from converters.streaming import checkpoint_tensors, iter_checkpoint
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model

    hf_to_mcore(hf_path, streamed, tp=2, pp=1, progress=False)
    spec = arch_from_hf_config(hf_path)
    model = build_model(spec, dtype=torch.bfloat16, device=torch.device("cpu"))
    load_hf_into_model(model, spec, hf_path)
    save_model(model, saved)
    left = [p.cmdline() for p in psutil.Process().children(recursive=True)]
    a, b = checkpoint_tensors(os.path.join(streamed, "model")), checkpoint_tensors(saved)
    assert a == b  # same keys, global shapes, dtypes
    keys = [(key, layer) for key, layer, _ in export_order(spec, a)]
    pairs = zip(iter_checkpoint(os.path.join(streamed, "model"), keys), iter_checkpoint(saved, keys))
    return [(k, layer) for (k, layer, x), (_, _, y) in pairs if not torch.equal(x, y)], len(keys), left


def test_streamed_checkpoint_matches_megatron_writer(tiny_model_factory, tmp_path):
    """...and a save leaves no process behind: megatron's writer would spawn a helper on the first
    save, which a SIGTERM or Ctrl-C to the job kills before the save that signal asks for."""
    src = tiny_model_factory("qwen2", dtype=torch.bfloat16)
    for differing, n, left in run_ranks(_streamed_and_megatron_saved_worker, 2, src, str(tmp_path / "streamed"),
                                        str(tmp_path / "saved")):
        assert n > 10 and differing == []
        assert left == []


def _logits_from_ckpt(mcore_path, tp, pp, ids):
    from converters.checkpoint import load_model
    from mcore_rl.distributed import init_distributed
    from mcore_rl.models.arch import arch_from_hf_config
    from mcore_rl.models.build import build_model
    from mcore_rl.models.forward import run_microbatches
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    init_distributed(tp, pp)
    spec = arch_from_hf_config(os.path.join(mcore_path, "hf"))
    model = build_model(spec)
    load_model(model, os.path.join(mcore_path, "model"))
    out = run_microbatches(model, [{"input_ids": ids}], lambda o, mb: (
        o.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(o)[..., :spec.vocab_size]}), forward_only=True)
    return out[0]["logits"], ps.get_tensor_model_parallel_rank()


def test_tp2_checkpoint_loads_at_tp1_and_pp2(tiny_model_factory, tmp_path):
    import transformers as tf

    src = tiny_model_factory("llama")
    ids = torch.randint(0, 250, (2, 30), generator=torch.Generator().manual_seed(3))
    m = str(tmp_path / "m")
    # one pair of processes: convert at TP=2, then load it at PP=2 and at TP=2
    two = run_ranks(in_turn, 2, {"convert": (_convert_worker, (src, m, 2, 1)),
                                 "pp2": (_logits_from_ckpt, (m, 1, 2, ids)),
                                 "tp2": (_logits_from_ckpt, (m, 2, 1, ids))})
    pp2, tp2 = [r["pp2"] for r in two], [r["tp2"] for r in two]
    tp1 = run_ranks(_logits_from_ckpt, 1, m, 1, 1, ids)[0][0]
    for logits, _ in pp2 + tp2:
        assert torch.equal(logits, tp1) or (logits - tp1).abs().max() < 1e-5
    assert torch.equal(pp2[0][0], tp1)  # same math, different placement: identical
    with torch.no_grad():
        ref = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
    assert (tp1 - ref).abs().max() < 1e-4


def test_cli_end_to_end_and_transformers_loads_export(tiny_model_factory, tmp_path):
    import transformers as tf

    src = tiny_model_factory("qwen3")
    cli = [sys.executable, "-m", "mcore_rl.cli", "convert"]
    r = subprocess.run(cli + ["hf-to-mcore", "--hf-path", src, "--out", str(tmp_path / "m"), "--tp", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(cli + ["mcore-to-hf", "--mcore-path", str(tmp_path / "m"), "--out", str(tmp_path / "h"),
                              "--shard-mb", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.load(open(tmp_path / "h" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1  # sharded output with an index
    _assert_bit_exact(src, tmp_path / "h")
    ids = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        a = tf.AutoModelForCausalLM.from_pretrained(src)(ids).logits
        b = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "h"))(ids).logits
    assert torch.equal(a, b)


def _convert_cli(*args):
    from mcore_rl.commands.convert import main

    return main(list(args))


def test_clear_errors(tiny_model_factory, tmp_path, capsys):
    llama = tiny_model_factory("llama")  # 4 heads, 2 kv heads, 2 layers
    out = str(tmp_path / "out")

    def err(*args):
        assert _convert_cli(*args) == 2
        return capsys.readouterr().err

    assert "not divisible by TP=4" in err("hf-to-mcore", "--hf-path", llama, "--out", out, "--tp", "4")
    assert "num_key_value_heads=2 is not divisible by TP=4" in err("hf-to-mcore", "--hf-path", llama, "--out", out, "--tp", "4")
    assert "num_hidden_layers=2 is not divisible by PP=3" in err("hf-to-mcore", "--hf-path", llama, "--out", out, "--pp", "3")
    # unknown architecture
    cfg = json.load(open(os.path.join(llama, "config.json")))
    bad = tmp_path / "gpt2"
    bad.mkdir()
    json.dump({**cfg, "architectures": ["GPT2LMHeadModel"]}, open(bad / "config.json", "w"))
    msg = err("hf-to-mcore", "--hf-path", str(bad), "--out", out)
    assert "unsupported architecture 'GPT2LMHeadModel'" in msg and "LlamaForCausalLM" in msg
    # missing weights
    missing = tmp_path / "noweights"
    missing.mkdir()
    json.dump(cfg, open(missing / "config.json", "w"))
    assert "no safetensors weights" in err("hf-to-mcore", "--hf-path", str(missing), "--out", out)
    # corrupt weights
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    json.dump(cfg, open(corrupt / "config.json", "w"))
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    assert "corrupt safetensors file" in err("hf-to-mcore", "--hf-path", str(corrupt), "--out", out)
    # non-empty output directory: refused, and its content untouched
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").write("precious")
    assert "is not empty; pass --force" in err("hf-to-mcore", "--hf-path", llama, "--out", out)
    assert open(os.path.join(out, "keep.txt")).read() == "precious"
    # unsupported feature inside a supported architecture
    feat = tmp_path / "ropeyarn"
    feat.mkdir()
    json.dump({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, open(feat / "config.json", "w"))
    assert "rope scaling type 'yarn' is not supported" in err("hf-to-mcore", "--hf-path", str(feat), "--out", out + "2")


# Runs one conversion in a fresh process; prints the RSS after imports and the peak RSS (VmHWM).
_MEASURE = r"""
import json, sys
import torch, megatron.core.dist_checkpointing, megatron.core.models.gpt, mcore_rl.models.build, tqdm
import converters.checkpoint as c, converters.streaming
def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":"))) * 1024
base = status("VmRSS")
fn = c.hf_to_mcore if sys.argv[1] == "hf-to-mcore" else c.mcore_to_hf
fn(sys.argv[2], sys.argv[3], progress=False)
print("RSS", json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def _write_random_llama(path, layers, hidden, ffn, vocab, heads):
    """A random bf16 Llama checkpoint written tensor by tensor (the writer holds nothing)."""
    from converters.hf_io import HFWriter
    from converters.mapping import NameIndex
    from mcore_rl.models.arch import arch_from_hf_config

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=ffn,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
               max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
    os.makedirs(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    shapes = {"embed_tokens": (vocab, hidden), "lm_head": (vocab, hidden), "norm": (hidden,),
              "_proj": (hidden, hidden), "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden),
              "down_proj": (hidden, ffn)}
    names = NameIndex(arch_from_hf_config(cfg)).all_hf_names()
    layout = [(n, next(s for k, s in reversed(shapes.items()) if k in n), torch.bfloat16) for n in names]
    writer = HFWriter(path, shard_mb=256, tensors=layout)
    g = torch.Generator().manual_seed(0)
    for name, shape, dtype in layout:
        writer.add(name, torch.randn(shape, generator=g).to(dtype))
    writer.close()
    return writer.total


def test_conversion_streams_with_bounded_memory(tmp_path):
    """Peak RSS of each direction stays within a small multiple of the largest tensor (16 MiB
    here) above the process baseline, far below the 548 MB model: loading the model whole, or
    memory-mapping the input as it is read, would add at least the model's size."""
    src = str(tmp_path / "hf")
    model_bytes = _write_random_llama(src, layers=16, hidden=1024, ffn=4096, vocab=8192, heads=8)
    assert model_bytes > 500e6
    for direction, a, b in (("hf-to-mcore", src, tmp_path / "m"), ("mcore-to-hf", tmp_path / "m", tmp_path / "h")):
        r = subprocess.run([sys.executable, "-c", _MEASURE, direction, str(a), str(b)], capture_output=True,
                           text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stderr[-3000:]
        rss = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RSS "))[4:])
        extra = rss["peak"] - rss["base"]
        print(f"{direction}: baseline {rss['base'] / 2**20:.0f} MiB, peak {rss['peak'] / 2**20:.0f} MiB, "
              f"extra {extra / 2**20:.0f} MiB for a {model_bytes / 2**20:.0f} MiB model")
        assert extra < model_bytes / 3, (direction, extra, model_bytes)
    _assert_bit_exact(src, tmp_path / "h")
