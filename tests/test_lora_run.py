"""A LoRA actor through the real trainer (`python -m mcore_rl.commands.train`, toy GRPO task).

- The actor's checkpoint holds its adapters alone (the frozen base is the HF model the run starts
  from), and a run resumed from its step-2 checkpoint continues exactly: steps 3-4 equal the
  uninterrupted run's (every metric that depends on the model, the data and the samples), and so
  do they when it is resumed at DP=2.
- `mcore-rl export` of the step-4 checkpoint (offline, from the distributed checkpoint) writes
  the same merged model and peft adapter as the trainer's own export at the end of the run.
- The trained adapter is not a fresh one (B moved away from zero), and the merged model differs
  from the base model exactly where adapters sit.
- The adapters resume only on the base they were trained on (its fingerprint is recorded).
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from test_lora_export import _tensors
from test_resume import _assert_same, _env, _log, _metrics, _run, _torchrun

pytestmark = pytest.mark.resume
LORA = ("configs/toy_grpo.yaml", "actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16",
        "actor_rollout_ref.model.target_modules=q_proj,v_proj,down_proj", "actor_rollout_ref.actor.optim.lr=1e-3")


def _args(out, *extra):
    return [*LORA, f"trainer.output_dir={out}", "trainer.max_steps=4", "trainer.logger=[console]", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_reference")
    p = _run(_args(out, "trainer.save_freq=2", "trainer.export_hf_at_end=true"))
    assert p.returncode == 0, _log(p)
    return out, _metrics(out)


@pytest.mark.parametrize("layout", ["same", "dp2"])
def test_resumed_lora_run_continues_exactly(reference, tmp_path, layout):
    """The step-2 checkpoint (adapters alone) continued in one process: steps 3-4 equal the
    uninterrupted run's exactly; at DP=2 (2 gloo ranks, each with half of the batch, the adapters'
    gradients averaged over DP) to float noise."""
    from converters.streaming import checkpoint_tensors

    ref_out, ref = reference
    saved = checkpoint_tensors(str(ref_out / "checkpoints" / "step_00000002" / "actor" / "model"))
    assert saved and all("_lora." in k for k in saved), sorted(saved)[:5]  # adapters only, no base weights
    args = _args(tmp_path / "resumed", f"trainer.resume={ref_out / 'checkpoints' / 'step_00000002'}",
                 "trainer.export_hf_at_end=false")
    p = _run(args) if layout == "same" else _torchrun(args)
    assert p.returncode == 0, _log(p)
    assert ("resumed from" if layout == "same" else "TP=1 PP=1 DP=2") in p.stdout, _log(p)
    got = _metrics(tmp_path / "resumed")
    assert sorted(got) == [3, 4]
    _assert_same(got, ref, [3, 4], tol=0.0 if layout == "same" else 1e-4)


def test_export_of_the_checkpoint_is_the_end_of_run_export(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "exported"
    p = subprocess.run([sys.executable, "-m", "mcore_rl.cli", "export", "--ckpt", str(ref_out), "--out", str(out)],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    end = ref_out / "hf_model"
    for sub in ("", "lora_adapter"):
        a, b = _tensors(end / sub), _tensors(out / sub)
        assert set(a) == set(b) and a, sub
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    cfg = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    trained = _tensors(out / "lora_adapter")
    assert all(t.abs().max() > 0 for k, t in trained.items() if ".lora_B." in k)  # B left zero: nothing learned
    base, merged = _tensors(ref_out / "toy_model"), _tensors(out)
    adapted = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
               for k in trained if ".lora_A." in k}
    assert set(merged) == set(base)
    for k in base:
        assert torch.equal(merged[k], base[k]) == (k not in adapted), k


def _other_base(src, dst):
    """A copy of the HF model in `src` at `dst` with one weight changed (same architecture and files)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (f,) = dst.glob("*.safetensors")
    tensors = load_file(str(f))
    name = sorted(k for k in tensors if k.endswith("down_proj.weight"))[-1]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_adapters_resume_only_on_their_base(reference, tmp_path):
    """The checkpoint records its base's fingerprint: a copy of the base elsewhere has the same one,
    another model with the same files (one weight changed) does not, and resuming the adapters on
    it stops with both paths, before any step."""
    from converters.adapter import base_fingerprint, check_base

    ref_out, _ = reference
    base = ref_out / "toy_model"
    meta = json.loads((ref_out / "checkpoints" / "step_00000002" / "actor" / "mcore_rl.json").read_text())["lora"]
    assert meta["base_model"] == str(base) and meta["base_fingerprint"] == base_fingerprint(str(base))
    shutil.copytree(base, tmp_path / "copy")
    check_base(meta, str(tmp_path / "copy"), "a copy")  # accepted
    _other_base(base, tmp_path / "other")
    with pytest.raises(ValueError, match="trained on the base model"):
        check_base(meta, str(tmp_path / "other"), "another model")
    p = _run(_args(tmp_path / "resumed", f"trainer.resume={ref_out / 'checkpoints' / 'step_00000002'}",
                   f"actor_rollout_ref.model.path={tmp_path / 'other'}", "trainer.export_hf_at_end=false"))
    assert p.returncode != 0, _log(p)
    assert "trained on the base model" in p.stdout + p.stderr and str(tmp_path / "other") in p.stdout + p.stderr, _log(p)
    assert not (tmp_path / "resumed" / "metrics.jsonl").exists() or not _metrics(tmp_path / "resumed")
