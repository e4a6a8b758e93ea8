"""Exporting a LoRA actor: the merged HF model and the adapters in peft's format.

A tiny Llama with random adapters (B non-zero) on q_proj, v_proj and down_proj (a fused, a
partly fused and a row-parallel linear) at TP=2 (gloo, 2 ranks) is exported twice: live
(`export_hf`, what the trainer writes at the end) and offline from its distributed checkpoint
(`mcore_to_hf`, what `mcore-rl export` runs). The references are independent: peft's
`PeftModel.from_pretrained` of the written adapter on the HF base model, and transformers
loading the merged model, must both give the Megatron LoRA model's logits; the two exports must
be the same files, tensor for tensor.
"""

import json
import os

import pytest
import torch

from conftest import make_tiny_hf_model
from dist_utils import run_ranks
from test_lora import ALPHA, IDS, RANK, _logits, _random_adapters

pytestmark = pytest.mark.convert
TARGETS = "q_proj,v_proj,down_proj"


def _worker(path, adapters, root):
    import torch.distributed as dist

    from converters.adapter import lora_meta
    from converters.checkpoint import export_hf, mcore_to_hf, save_model, write_side
    from mcore_rl.models import lora
    from test_lora import _build

    spec, model = _build(path, 2, 1)
    lora.add_lora(model, lora.LoRAConfig(RANK, ALPHA, lora.resolve_targets(TARGETS, spec)))
    lora.load_adapters(model, adapters)
    logits = _logits(model, IDS)
    export_hf(model, path, os.path.join(root, "live"), progress=False)
    ckpt = os.path.join(root, "ckpt")
    save_model(model, os.path.join(ckpt, "model"))
    if dist.get_rank() == 0:
        write_side(ckpt, path, spec, torch.float32, {"tp": 2, "pp": 1},
                   lora={**lora_meta(lora.lora_of(model)), "base_model": path})
    dist.barrier()
    mcore_to_hf(ckpt, os.path.join(root, "offline"), progress=False)
    return logits


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    path = make_tiny_hf_model(root / "base", "llama")
    adapters = _random_adapters(path, TARGETS)
    logits = run_ranks(_worker, 2, path, adapters, str(root))[0]
    return path, root, adapters, logits


def test_peft_loads_the_adapter_and_transformers_the_merged_model(exported):
    import peft
    import transformers as tf

    path, root, adapters, logits = exported
    adapter_dir = root / "live" / "lora_adapter"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (RANK, ALPHA, sorted(TARGETS.split(",")))
    base = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        base_logits = base(IDS).logits
        assert (base_logits - logits).abs().max() > 1e-2  # the adapters change the model
        with_adapter = peft.PeftModel.from_pretrained(base, str(adapter_dir))(IDS).logits
        merged = tf.AutoModelForCausalLM.from_pretrained(root / "live", dtype=torch.float32,
                                                         attn_implementation="eager")(IDS).logits
    scale = logits.abs().max().item()
    assert (with_adapter - logits).abs().max().item() < 1e-4 * scale
    assert (merged - logits).abs().max().item() < 1e-4 * scale
    # the adapter file holds exactly the adapters the model was given, in peft's names
    written = _tensors(adapter_dir)
    assert set(written) == {f"base_model.model.{k}" for k in adapters}
    for k, v in adapters.items():
        assert torch.equal(written[f"base_model.model.{k}"], v), k


def test_offline_export_of_the_checkpoint_is_the_live_export(exported):
    _, root, _, _ = exported
    for sub in ("", "lora_adapter"):
        live, offline = _tensors(root / "live" / sub), _tensors(root / "offline" / sub)
        assert set(live) == set(offline) and live
        for k in live:
            assert torch.equal(live[k], offline[k]), (sub, k)
    cfg = lambda d: json.loads((d / "lora_adapter" / "adapter_config.json").read_text())  # noqa: E731
    assert cfg(root / "live") == cfg(root / "offline")
