"""Checkpoints, resume and faults, on the real toy run (`python -m mcore_rl.commands.train`).

Every run is a separate process, killed for real (SIGKILL / SIGTERM). The reference is one
uninterrupted run with the same seed; a resumed run must reproduce its later steps exactly
(same layout) or to float tolerance (another TP/PP layout).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dist_utils import free_port

pytestmark = pytest.mark.resume

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# every metric that depends on the model, the data and the samples (not timings)
COMPARED = ("reward/mean", "reward/max", "actor/loss", "actor/pg_loss", "actor/kl", "actor/grad_norm",
            "critic/loss", "critic/grad_norm", "actor/entropy", "response/length_mean")


def _args(out: Path, *extra: str) -> list[str]:
    return [f"trainer.output_dir={out}", f"trainer.max_steps={STEPS}", "trainer.logger=[console]",
            "data.train_batch_size=64", "trainer.export_hf_at_end=false", *extra]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cmd(script: Path | None = None) -> list[str]:
    return [sys.executable, str(script)] if script else [sys.executable, "-m", "mcore_rl.commands.train"]


def _run(args, script=None, timeout=300, cmd=None) -> subprocess.CompletedProcess:
    """Run to the end in its own session; output goes to files, not pipes: after a SIGKILL, a
    helper process left behind would hold pipes open. Leftovers are killed."""
    cmd = cmd or _cmd(script) + args
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            _kill_group(proc)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, rc, out.read(), err.read())


def _kill_group(proc, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _torchrun(args, timeout=300) -> subprocess.CompletedProcess:
    return _run(None, timeout=timeout, cmd=[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                            f"--master-port={free_port()}", "-m", "mcore_rl.commands.train", *args])


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: r for r in rows}


def _assert_same(got: dict, ref: dict, steps, tol: float) -> None:
    for s in steps:
        for k in COMPARED:
            if k in ref[s]:
                assert math.isclose(got[s][k], ref[s][k], rel_tol=0, abs_tol=tol), (s, k, got[s][k], ref[s][k])


def _latest(out: Path) -> str | None:
    p = out / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


def _log(p) -> str:
    return f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted run, checkpointing every 2 steps."""
    out = tmp_path_factory.mktemp("reference")
    p = _run(_args(out, "trainer.save_freq=2", "trainer.export_hf_at_end=true"))
    assert p.returncode == 0, _log(p)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    return out, _metrics(out)


def _popen(args, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd() + args, env=_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.log = log
    return proc


def _wait_for(cond, proc, timeout=240, what="") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}:\n{proc.log.read_text()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_after_step_k_resume_equals_uninterrupted(reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "run"
    proc = _popen(_args(out, "trainer.save_freq=1"), tmp_path / "killed.log")
    _wait_for(lambda: _latest(out) == "step_00000002", proc, what="the step-2 checkpoint")
    _kill_group(proc)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    p = _run(_args(out, "trainer.save_freq=1", "trainer.export_hf_at_end=true"))  # trainer.resume=auto is the default
    assert p.returncode == 0, _log(p)
    assert "resumed from" in p.stdout and "RNG restored" in p.stdout, _log(p)
    got = _metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    _assert_same(got, ref, range(1, STEPS + 1), tol=1e-6)
    # trainer.max_ckpt_to_keep=2 (default): only the two newest survive
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000003", "step_00000004"]
    # the final actor weights equal the uninterrupted run's, bit for bit (both runs export them at
    # the end, trainer.export_hf_at_end; test_nan_loss_skips_reports_and_stops uses `mcore-rl export`)
    x, y = out / "hf_model", ref_out / "hf_model"
    from safetensors.torch import load_file

    tx, ty = load_file(next(x.glob("*.safetensors"))), load_file(next(y.glob("*.safetensors")))
    assert sorted(tx) == sorted(ty) and all(torch.equal(tx[k], ty[k]) for k in tx)


KILL_MID_SAVE = r'''
import os, signal, sys
import mcore_rl.trainer.checkpointing as ck
original = ck.save_model_and_optimizer
def save_then_die(model, opt, where):
    # the actor of step 4 is on disk, the critic not yet: die between the two shard writes
    if "step_00000004" in where and where.endswith("critic"):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(model, opt, where)
ck.save_model_and_optimizer = save_then_die
if __name__ == "__main__":  # a spawned helper process (the reward scorer's) imports this file
    from mcore_rl.commands.train import main
    sys.exit(main(sys.argv[1:]))
'''


def test_sigkill_during_save_keeps_previous_checkpoint(reference, tmp_path):
    _, ref = reference
    script = tmp_path / "kill_mid_save.py"
    script.write_text(KILL_MID_SAVE)
    out = tmp_path / "run"
    p = _run(_args(out, "trainer.save_freq=2"), script=script)
    assert p.returncode == -signal.SIGKILL, _log(p)
    ckpts = out / "checkpoints"
    assert _latest(out) == "step_00000002"
    assert (ckpts / ".step_00000004.tmp" / "actor" / "model").is_dir()  # the half-written save
    assert not (ckpts / "step_00000004").exists()
    p = _run(_args(out, "trainer.save_freq=2"))
    assert p.returncode == 0, _log(p)
    assert f"resumed from {ckpts / 'step_00000002'}" in p.stdout, _log(p)
    assert not (ckpts / ".step_00000004.tmp").exists() and _latest(out) == "step_00000004"
    _assert_same(_metrics(out), ref, range(1, STEPS + 1), tol=1e-6)


def test_sigterm_saves_exits_zero_and_resumes(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    log = tmp_path / "terminated.log"
    proc = _popen(_args(out), log)  # save_freq=-1: the only checkpoint is the one SIGTERM asks for
    _wait_for(lambda: (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 1,
              proc, what="step 1")
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    _kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "SIGTERM: stopped after step" in text
    stopped = int(_latest(out).split("_")[1])
    assert 1 <= stopped < STEPS, text[-2000:]
    assert sorted(_metrics(out)) == list(range(1, stopped + 1))
    p = _run(_args(out))
    assert p.returncode == 0, _log(p)
    assert f"step {stopped}, saved at" in p.stdout
    _assert_same(_metrics(out), ref, range(1, STEPS + 1), tol=1e-6)


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_resume_at_another_layout(reference, tmp_path, layout):
    """A TP=1 checkpoint continued at TP=2, PP=2 or DP=2 (2 gloo ranks): the same metrics as
    the single-process run, to float noise. This is also the trainer's layout-parity test:
    rewards agree because sampling seeds are per prompt, not per rank."""
    ref_out, ref = reference
    out = tmp_path / "run"
    extra = {"tp2": ["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"],
             "pp2": ["actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2"], "dp2": []}[layout]
    p = _torchrun(_args(out, f"trainer.resume={ref_out / 'checkpoints' / 'step_00000002'}", *extra))
    assert p.returncode == 0, _log(p)
    assert "saved at TP=1 PP=1 DP=1; RNG not restored: layout differs" in p.stdout, _log(p)
    assert {"tp2": "TP=2 PP=1 DP=1", "pp2": "TP=1 PP=2 DP=1", "dp2": "TP=1 PP=1 DP=2"}[layout] in p.stdout
    got = _metrics(out)
    assert sorted(got) == [3, 4]
    _assert_same(got, ref, [3, 4], tol=1e-4)


NAN_LOSS = r'''
import sys
import torch
import mcore_rl.trainer.ppo_update as ppo_update
from mcore_rl.trainer.ppo_trainer import PPOTrainer
original_loss, original_step = ppo_update.policy_loss, PPOTrainer.train_step
state = {"step": 0}
def nan_loss(*args, **kwargs):
    loss, metrics = original_loss(*args, **kwargs)
    return (loss * float("nan") if state["step"] >= 2 else loss), metrics
def train_step(self):
    state["step"] = self.step
    return original_step(self)
ppo_update.policy_loss, PPOTrainer.train_step = nan_loss, train_step
if __name__ == "__main__":  # a spawned helper process (the reward scorer's) imports this file
    from mcore_rl.commands.train import main
    sys.exit(main(sys.argv[1:]))
'''


def test_nan_loss_skips_reports_and_stops(tmp_path):
    script = tmp_path / "nan_loss.py"
    script.write_text(NAN_LOSS)
    out = tmp_path / "run"
    p = _run(_args(out, "trainer.save_freq=1", "trainer.max_steps=6", "trainer.max_bad_steps=2"), script=script)
    assert p.returncode == 3, _log(p)
    assert "step 2: non-finite loss or gradient norm" in p.stdout and "update(s) skipped" in p.stdout, _log(p)
    assert "stopping: 2 steps in a row with a non-finite loss" in p.stderr, _log(p)
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3] and m[1]["actor/skipped_updates"] == 0
    assert m[2]["actor/skipped_updates"] > 0 and m[3]["actor/skipped_updates"] > 0
    # only the good step was checkpointed, and its weights are finite
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000001"]
    from safetensors.torch import load_file

    e = subprocess.run([sys.executable, "-m", "mcore_rl.cli", "export", "--ckpt", str(out), "--out", str(tmp_path / "hf")],
                       env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert e.returncode == 0, _log(e)
    assert all(torch.isfinite(t).all() for t in load_file(next((tmp_path / "hf").glob("*.safetensors"))).values())


def test_hf_export_at_end_loads_in_transformers_and_vllm(reference):
    """The run's final actor, exported: transformers and vLLM load it and agree on greedy output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcore_rl.rollout import Sampling, make_engine

    out, _ = reference
    hf = out / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    prompts = [tok(f"{d}:")["input_ids"] for d in "0369"]
    want = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=tok.pad_token_id)[0, len(p):].tolist() for p in prompts]
    engine = make_engine("vllm", model_path=str(hf), dtype="float32", max_model_len=32)
    try:
        got = [o.token_ids for o in engine.generate(prompts, Sampling(temperature=0.0, max_tokens=8, ignore_eos=True))]
    finally:
        engine.close()
    assert got == want


def _main(args) -> int:
    """`mcore-rl train` in this process: for bad input, refused before any process group exists."""
    from mcore_rl.commands.train import main

    return main(args)


def test_resume_path_errors(tmp_path, capsys):
    import torch.distributed as dist

    assert _main(_args(tmp_path / "run", f"trainer.resume={tmp_path / 'nowhere'}")) == 2
    assert "no complete checkpoint there" in capsys.readouterr().err and not dist.is_initialized()


REWARD_THAT_RAISES = r'''
def reward(prompt, response, ground_truth):
    if prompt.startswith("3"):
        raise ZeroDivisionError("this reward cannot score prompts about 3")
    return float(response.startswith(prompt[0]))
'''


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> str:
    from mcore_rl.toy import build_toy_model

    return build_toy_model(tmp_path_factory.mktemp("toy") / "model", seed=1)


def _data_args(tmp_path, model, *extra):
    rows = [{"prompt": f"{i % 10}:", "answer": str(i % 10)} for i in range(16)]
    rows[2] = {"text": "2:"}                      # no prompt column
    rows[5] = {"prompt": "  "}                    # empty prompt
    rows[7] = {"prompt": "1234567890123:"}        # longer than max_prompt_length=8
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_reward.py").write_text(REWARD_THAT_RAISES)
    return [f"actor_rollout_ref.model.path={model}", f"data.dataset_name={data}", "data.train_batch_size=8",
            "data.max_prompt_length=8", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "critic.ppo_micro_batch_size_per_gpu=8",
            "actor_rollout_ref.rollout.name=hf", f"reward.name={tmp_path / 'my_reward.py'}:reward",
            f"trainer.output_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.logger=[console]",
            "trainer.export_hf_at_end=false", *extra]


def test_bad_data_rows_and_raising_reward_are_reported(tmp_path, toy_model):
    """on_bad_row=skip: each bad row named with file and row, the run goes on; a reward function
    that raises is reported with the sample (score 0) and does not stop the run."""
    p = _run(_data_args(tmp_path, toy_model))
    assert p.returncode == 0, _log(p)
    data = tmp_path / "prompts.jsonl"
    for row, why in ((2, "no prompt column 'prompt'"), (5, "empty prompt"), (7, "max_prompt_length=8")):
        line = next((ln for ln in p.stdout.splitlines() if f"{data}:{row + 1} (row {row})" in ln), None)
        assert line is not None and "skipped bad data row" in line and why in line, _log(p)
    errors = [ln for ln in p.stdout.splitlines() if "reward error" in ln]
    assert errors and all("ZeroDivisionError" in ln and "prompts about 3" in ln for ln in errors), _log(p)
    assert sorted(_metrics(tmp_path / "run")) == [1, 2]


def test_bad_data_row_fatal_when_configured(tmp_path, toy_model, capsys):
    import torch.distributed as dist

    assert _main(_data_args(tmp_path, toy_model, "data.on_bad_row=error")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'prompts.jsonl'}:3 (row 2)" in err and "no prompt column" in err, err
    assert not dist.is_initialized()


def test_resolve_resume(reference, tmp_path):
    """auto / off (also YAML's bare `off` = False) / PATH, the `latest` pointer, and temp dirs."""
    from mcore_rl.config import load_config
    from mcore_rl.trainer.checkpointing import resolve_resume

    ref_out, _ = reference
    root = tmp_path / "checkpoints"
    shutil.copytree(ref_out / "checkpoints", root)
    assert resolve_resume("auto", str(root)) == str(root / "step_00000004")
    off = load_config(None, ["trainer.resume=off"]).trainer.resume
    assert resolve_resume(off, str(root)) is None and resolve_resume("off", str(root)) is None
    assert resolve_resume(str(root / "step_00000002"), "/elsewhere") == str(root / "step_00000002")
    assert resolve_resume(str(tmp_path), "/elsewhere") == str(root / "step_00000004")  # a run's output dir
    (root / "latest").write_text("step_00000002\n")
    assert resolve_resume("auto", str(root)) == str(root / "step_00000002")
    (root / "latest").unlink()  # no pointer: the newest complete one; a temp dir never counts
    (root / ".step_00000009.tmp").mkdir()
    (root / "step_00000007").mkdir()  # no trainer_state.json: incomplete
    assert resolve_resume("auto", str(root)) == str(root / "step_00000004")
    assert resolve_resume("auto", str(tmp_path / "empty")) is None
