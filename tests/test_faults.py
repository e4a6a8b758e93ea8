"""Faults injected into the real toy run: nothing lost, nothing hangs, bad input named early.

Each run is a separate process in its own session, stopped for real (SIGINT to the whole
group as a terminal's Ctrl-C does, SIGTERM to a torchrun job, SIGKILL); afterwards no
process of the session may be left (the reward helper and the checkpoint writer's forked
children die with their rank). Bad inputs go through the public CLI in-process and must fail
with one line, exit code 2, before any process group exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import free_port
from test_resume import _wait_for

pytestmark = pytest.mark.resume

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=32", "trainer.logger=[console]",
         "trainer.export_hf_at_end=false", "actor_rollout_ref.rollout.name=hf"]
# A reward that never returns on prompts about 7 and takes 50 ms on the others: with 32 prompts
# and reward.timeout_s=2 every step scores for 1.6-2 s, long enough to signal a run mid-step.
HANGS_ON_7 = r'''
import time
def reward(prompt, response, ground_truth):
    while prompt.startswith("7"):
        time.sleep(1)
    time.sleep(0.05)
    return float(response.startswith(prompt[0]))
'''


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MCORE_RL_DEBUG"):
        env.pop(k, None)
    return env


def _args(out: Path, *extra: str) -> list[str]:
    return [f"trainer.output_dir={out}", *SMALL, *extra]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.log = log
    return proc


def _train(args, log: Path) -> subprocess.Popen:
    return _start([sys.executable, "-m", "mcore_rl.commands.train", *args], log)


def _finish(proc, timeout=300) -> str:
    """Wait for the run; then every process of its session must be gone within a few seconds."""
    try:
        proc.wait(timeout=timeout)
    finally:
        left = _session_left(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = proc.log.read_text()
    assert not left, f"processes left behind: {left}\n{text[-3000:]}"
    return text


def _session_left(proc, grace=10.0) -> list[str]:
    deadline = time.monotonic() + grace
    while True:
        left = [ln for ln in subprocess.run(["ps", "-o", "pid=,args=", "-s", str(proc.pid)], capture_output=True,
                                            text=True).stdout.splitlines() if ln.strip()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _latest(out: Path) -> str | None:
    p = out / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = _train(_args(out, "trainer.max_steps=2", "trainer.save_freq=1"), out.parent / "log")
    text = _finish(proc)
    assert proc.returncode == 0, text[-4000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000001", "step_00000002"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, symlinks=True)
    return dst


def _main(args):
    from mcore_rl.commands.train import main

    return main(args)


# ------------------------------------------------------------------------------ one run per output dir
def test_fresh_start_in_another_runs_dir_is_refused(finished, tmp_path, capsys):
    import torch.distributed as dist

    out = _copy(finished, tmp_path)
    before = _tree(out)
    t0 = time.perf_counter()
    assert _main(_args(out, "trainer.resume=off")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another run (checkpoints step_00000001..step_00000002, metrics.jsonl)" in err
    for choice in ("trainer.resume=auto", "trainer.output_dir=DIR", "trainer.on_previous_run=move_aside"):
        assert choice in err, err
    # resuming some other run's checkpoint into it would mix two runs just the same
    assert _main(_args(out, f"trainer.resume={finished / 'checkpoints' / 'step_00000001'}")) == 2
    assert "holds another run" in capsys.readouterr().err
    assert _tree(out) == before and not dist.is_initialized() and time.perf_counter() - t0 < 30


def test_move_aside_keeps_the_old_run_and_a_sigkilled_rank_leaves_no_helper(finished, tmp_path):
    """on_previous_run=move_aside: the old run's files go to previous/<its run id>/ untouched and
    the new run starts its own lineage. The new run is then SIGKILLed: no process of it is left
    (its reward helper dies with it)."""
    out = _copy(finished, tmp_path)
    old_id = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())["run_id"]
    old = {f: _tree(out / f) if (out / f).is_dir() else (out / f).read_bytes() for f in ("checkpoints", "metrics.jsonl")}
    proc = _train(_args(out, "trainer.resume=off", "trainer.on_previous_run=move_aside", "trainer.max_steps=50"),
                  tmp_path / "log")
    _wait_for(lambda: any(r.get("run_id") != old_id for r in _rows(out)), proc, what="step 1 of the new run")
    os.kill(proc.pid, signal.SIGKILL)
    _finish(proc)
    moved = out / "previous" / old_id
    assert {f: _tree(moved / f) if (moved / f).is_dir() else (moved / f).read_bytes() for f in old} == old
    new_ids = {r["run_id"] for r in _rows(out)}
    assert len(new_ids) == 1 and old_id not in new_ids and _rows(out)[0]["step"] == 1
    assert all(r["run_id"] == old_id for r in _rows(moved))
    assert f"moved the previous run's checkpoints step_00000001..step_00000002, metrics.jsonl to {moved}" in \
        proc.log.read_text()


# ------------------------------------------------------------------------------ damaged checkpoints
def test_damaged_newest_checkpoint_falls_back_to_the_sound_one(finished, tmp_path):
    out = _copy(finished, tmp_path)
    shard = sorted((out / "checkpoints" / "step_00000002" / "actor" / "model").glob("*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    proc = _train(_args(out, "trainer.max_steps=3"), tmp_path / "log")
    text = _finish(proc)
    assert proc.returncode == 0, text[-4000:]
    assert (f"checkpoint {out / 'checkpoints' / 'step_00000002'} is damaged (actor/model/{shard.name} has "
            f"{shard.stat().st_size} bytes") in text, text[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'} (step 1" in text
    ref, got = {r["step"]: r for r in _rows(finished)}, {r["step"]: r for r in _rows(out)}
    assert sorted(got) == [1, 2, 3] and len({r["run_id"] for r in got.values()}) == 1
    for k in ("reward/mean", "actor/loss", "critic/loss", "actor/grad_norm"):  # step 2 done again, the same
        assert got[2][k] == pytest.approx(ref[2][k], abs=1e-6), k


def test_cut_trainer_state_is_passed_over(finished, tmp_path):
    from mcore_rl.trainer.checkpointing import resolve_resume, verify_checkpoint

    root = _copy(finished, tmp_path) / "checkpoints"
    state = root / "step_00000002" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:200])
    skipped = []
    assert resolve_resume("auto", str(root), skipped) == str(root / "step_00000001")
    assert skipped == [(str(root / "step_00000002"), verify_checkpoint(str(root / "step_00000002")))]
    assert "trainer_state.json is unreadable (JSONDecodeError" in skipped[0][1]
    with pytest.raises(ValueError, match="this checkpoint is damaged"):
        resolve_resume(str(root / "step_00000002"), str(root))


# ------------------------------------------------------------------------------ signals, hung reward
def test_hung_reward_times_out_and_ctrl_c_checkpoints_then_a_second_aborts(tmp_path):
    """A reward that never returns costs reward.timeout_s per step, reported like a raising one.
    A first Ctrl-C (SIGINT to the whole group, as a terminal sends it) finishes the step and
    checkpoints (exit 0); a second one, a second later, aborts at once (exit 130)."""
    reward = tmp_path / "hangs.py"
    reward.write_text(HANGS_ON_7)
    out = tmp_path / "run"
    args = _args(out, "trainer.max_steps=50", f"reward.name={reward}:reward", "reward.timeout_s=2")
    proc = _train(args, tmp_path / "first.log")
    _wait_for(lambda: len(_rows(out)) >= 1, proc, what="step 1")
    os.killpg(proc.pid, signal.SIGINT)
    text = _finish(proc)
    assert proc.returncode == 0, text[-4000:]
    stopped = int(_latest(out).split("_")[1])
    assert f"SIGINT: stopped after step {stopped} with a checkpoint" in text
    assert [r["step"] for r in _rows(out)] == list(range(1, stopped + 1))
    hung = [ln for ln in text.splitlines() if "reward error (prompt" in ln]
    assert hung and all("did not return within reward.timeout_s=2 s (prompt '7:'" in ln for ln in hung), text[-3000:]

    from mcore_rl.trainer.checkpointing import verify_checkpoint

    assert verify_checkpoint(str(out / "checkpoints" / _latest(out))) is None
    proc = _train(args, tmp_path / "second.log")  # resumes; Ctrl-C twice inside a step
    _wait_for(lambda: len(_rows(out)) > stopped, proc, what="a step after the resume")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.3)
    os.killpg(proc.pid, signal.SIGINT)
    text = _finish(proc, timeout=60)
    assert proc.returncode == 130, text[-4000:]
    assert "mcore-rl train: interrupted" in text and "Traceback" not in text
    assert _latest(out) == f"step_{stopped:08d}"  # nothing saved from the aborted steps


def test_sigterm_under_torchrun_saves_and_leaves_nothing_running(tmp_path):
    """SIGTERM to the whole job (as Slurm sends it) under torchrun with 2 gloo ranks: both ranks
    finish the step, write one sound checkpoint and exit 0. torchrun itself then exits 1 (its
    SignalException, whatever its workers did); README says so."""
    out = tmp_path / "run"
    proc = _start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
                   "-m", "mcore_rl.commands.train", *_args(out, "trainer.max_steps=50")], tmp_path / "log")
    _wait_for(lambda: len(_rows(out)) >= 1, proc, what="step 1")
    os.killpg(proc.pid, signal.SIGTERM)
    text = _finish(proc)
    stopped = int(_latest(out).split("_")[1])
    assert text.count("SIGTERM received; checkpointing after step") == 2, text[-4000:]
    assert f"SIGTERM: stopped after step {stopped} with a checkpoint" in text
    assert "exitcode" not in text and "ChildFailedError" not in text  # no rank failed
    assert proc.returncode == 1 and "SignalException" in text

    from mcore_rl.trainer.checkpointing import verify_checkpoint

    assert verify_checkpoint(str(out / "checkpoints" / _latest(out))) is None
    assert [r["step"] for r in _rows(out)] == list(range(1, stopped + 1))


# ------------------------------------------------------------------------------ outputs never overlap inputs
def test_convert_and_export_refuse_an_output_that_overlaps_the_input(finished, tiny_model_factory, tmp_path, capsys):
    """--force replaces --out whole: an --out that is, contains or lies inside the input would
    delete the input. Refused, and the input is untouched."""
    from mcore_rl.commands.convert import main as convert
    from mcore_rl.commands.export import main as export

    hf = Path(tiny_model_factory("llama"))
    run = _copy(finished, tmp_path)
    actor = run / "checkpoints" / "step_00000002" / "actor"
    before = {p: _tree(p) for p in (hf, run)}
    capsys.readouterr()
    cases = [(convert, ["hf-to-mcore", "--hf-path", str(hf), "--out", str(out), "--force"])
             for out in (hf, hf.parent, hf / "sub")]
    cases += [(convert, ["mcore-to-hf", "--mcore-path", str(actor), "--out", str(out), "--force"])
              for out in (actor, actor.parent, actor / "hf")]
    cases += [(export, ["--ckpt", str(run), "--out", str(out), "--force"])
              for out in (run, run / "checkpoints", run / "checkpoints" / "step_00000002" / "x")]
    for main, argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is, contains or lies inside the input" in err, (argv, err)
    assert {p: _tree(p) for p in (hf, run)} == before


def test_failed_conversion_is_one_line_and_leaves_no_temp_dir(finished, tmp_path):
    actor = tmp_path / "actor"
    shutil.copytree(finished / "checkpoints" / "step_00000002" / "actor", actor)
    shard = sorted((actor / "model").glob("*.distcp"))[0]
    os.truncate(shard, 1000)
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "mcore_rl.cli", "convert", "mcore-to-hf", "--mcore-path", str(actor),
                        "--out", str(out)], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"mcore-rl convert: error: cannot read checkpoint {actor} (")
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["actor"]  # no hidden staging dir, no output


# ------------------------------------------------------------------------------ bad input, before allocation
def test_non_utf8_jsonl_line_is_named_and_skipped(tmp_path):
    from mcore_rl.data import BadRowError, load_prompts

    data = tmp_path / "prompts.jsonl"
    data.write_bytes(b'{"prompt": "1:"}\n{"prompt": "caf\xe9:"}\n{"prompt": "2:"}\n')
    ds = load_prompts(str(data))
    assert [s.prompt for s in ds] == ["1:", "2:"]
    assert [str(b) for b in ds.bad_rows] == [f"{data}:2 (row 1): cannot parse row: not UTF-8 text (byte 15: b'\\xe9')"]
    with pytest.raises(BadRowError, match=rf"{data}:2 \(row 1\): cannot parse row: not UTF-8"):
        load_prompts(str(data), on_bad_row="error")
    array = tmp_path / "prompts.json"
    array.write_bytes(b'[{"prompt": "caf\xe9:"}]')
    with pytest.raises(ValueError, match=rf"{array}: not a readable JSON array of rows \(UnicodeDecodeError"):
        load_prompts(str(array))


@pytest.mark.parametrize("bad,message", [
    ("data.dataset_name={tmp}/none.jsonl", "prompt source not found"),
    ("data.dataset_name={tmp}/latin1.jsonl", "no usable prompts in {tmp}/latin1.jsonl; first bad row: "
                                             "{tmp}/latin1.jsonl:1 (row 0): cannot parse row: not UTF-8"),
    ("reward.name={tmp}/none.py:fn", "reward function file not found"),
    ("trainer.logger=[console,tensorbord]", "trainer.logger=['console', 'tensorbord']: must be a list of console, "
                                            "tensorboard, wandb"),
])
def test_data_reward_and_logger_are_checked_before_building(bad, message, tmp_path, capsys):
    """Before any process group, model or rollout engine exists: in seconds, one line, exit 2."""
    import torch.distributed as dist

    from mcore_rl.toy import build_toy_model

    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9:"}\n')
    model = build_toy_model(tmp_path / "model", seed=1)
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = _main([f"actor_rollout_ref.model.path={model}", "data.dataset_name=toy", "data.train_batch_size=8",
                "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
                "critic.ppo_micro_batch_size_per_gpu=8", f"trainer.output_dir={tmp_path / 'run'}",
                bad.format(tmp=tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert not dist.is_initialized() and time.perf_counter() - t0 < 20


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(finished, tmp_path, capsys):
    from mcore_rl.cli import main as cli

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: {train_batch_size: 8\n")
    damaged = _copy(finished, tmp_path) / "checkpoints" / "step_00000002"
    (damaged / "trainer_state.json").write_text("{")
    for argv, message in ((["train", str(bad_yaml)], f"mcore-rl train: error: {bad_yaml} is not valid YAML: "),
                          (["train", "trainer.logger=[console"],
                           "mcore-rl train: error: override 'trainer.logger=[console': the value is not valid YAML"),
                          (["export", "--ckpt", str(damaged), "--out", str(tmp_path / "x")],
                           f"mcore-rl export: error: --ckpt={damaged}: this checkpoint is damaged (trainer_state.json "
                           f"is unreadable (JSONDecodeError"),
                          (["convert", "mcore-to-hf", "--mcore-path", str(bad_yaml.parent / "run"), "--out",
                            str(tmp_path / "y")], f"mcore-rl convert: error: {tmp_path / 'run'} is not a converted "
                                                  f"checkpoint")):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and len(err.splitlines()) == 1, (argv, err)
        assert cli(argv + ["--debug"]) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(message)


def test_installed_console_script_keeps_the_exit_codes(tmp_path):
    """The `mcore-rl` script pip wrote from pyproject.toml (the entry that also skips Python's
    exit-time garbage collection): a bad key is one line and exit code 2, --version exit code 0."""
    script = Path(sys.executable).parent / "mcore-rl"
    if not script.exists():
        pytest.skip("mcore-rl is not installed in this environment (pip install -e .)")
    bad = subprocess.run([str(script), "train", "no_such_section.key=1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [
        "mcore-rl train: error: unknown config key 'no_such_section' (from command line); valid sections: data, "
        "actor_rollout_ref, critic, algorithm, async_training, reward, trainer"]
    from mcore_rl import __version__

    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == __version__


def test_resume_auto_with_nothing_to_resume_moves_the_old_files_aside(tmp_path):
    """A job killed before its first checkpoint and started again with resume=auto (a Slurm
    requeue): its metrics are kept, aside, and the new start proceeds; resume=off refuses."""
    from mcore_rl.trainer.checkpointing import PreviousRunError, check_run_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "run_id": "r1"}\n')
    assert check_run_dir(str(out), None, "error", [], resume_auto=True) == ["metrics.jsonl"]
    with pytest.raises(PreviousRunError, match="holds another run"):
        check_run_dir(str(out), None, "error", [], resume_auto=False)
