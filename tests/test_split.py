"""Split placement on CPU: `mcore-rl train` under torchrun with 3 gloo ranks, 2 that train (DP=2)
and 1 that only runs the vLLM engine (`rollout.placement=split rollout.n_gpus=1`).

- staleness 0 reproduces the colocated run: the 1-rank golden curve of the toy GRPO task
  (tests/golden/toy_grpo.jsonl, committed from a colocated run) within the golden tolerance;
- staleness 1: batch k is generated with the weights after step k-2 (one step behind the
  weights it is trained from): step 1 is the golden step 1 (both use the initial weights), from
  step 2 on the rollout log-probs differ from the trainer's by an update's worth;
- a staleness-1 run resumed from its step-2 checkpoint continues exactly (the batch that was in
  flight is saved with the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import _free_port

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "toy_grpo.jsonl"
RTOL, ATOL = 1e-3, 1e-5  # the golden tolerance (tests/test_golden.py)
KEYS = ("reward/mean", "reward/max", "reward/min", "response/length_mean", "actor/loss", "actor/pg_loss",
        "actor/kl", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "actor/kl_loss")
SPLIT = [str(REPO / "configs" / "toy_grpo.yaml"), "actor_rollout_ref.rollout.placement=split",
         "actor_rollout_ref.rollout.n_gpus=1", "actor_rollout_ref.rollout.name=vllm", "trainer.logger=[console]",
         "trainer.export_hf_at_end=false", "trainer.dist_timeout_s=120"]


def _start(tmp: Path, name: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TMPDIR=str(tmp))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = open(tmp / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", f"--master_port={_free_port()}",
           "-m", "mcore_rl.cli", "train", *SPLIT, f"trainer.output_dir={tmp / 'run'}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = tmp / f"{name}.log"
    return proc


def _rows(proc: subprocess.Popen, out: Path) -> list[dict]:
    try:
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    log = proc.log_path.read_text()
    assert rc == 0, f"split run exited {rc}:\n{log[-6000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The staleness-0 run (5 steps) and the staleness-1 run (4 steps) start at once."""
    if torch.cuda.is_available():
        pytest.skip("CPU runs (the golden curve is the CPU's)")
    t0, t1 = tmp_path_factory.mktemp("split0"), tmp_path_factory.mktemp("split1")
    p0 = _start(t0, "s0", "trainer.max_steps=5")
    p1 = _start(t1, "s1", "trainer.max_steps=4", "async_training.staleness=1", "trainer.save_freq=2",
                "trainer.max_ckpt_to_keep=null")
    return {"s0": _rows(p0, t0 / "run"), "s1": _rows(p1, t1 / "run"), "s1_dir": t1 / "run"}


def _golden() -> list[dict]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line]


def _mismatches(rows: list[dict], golden: list[dict], keys=KEYS) -> list[str]:
    return [f"step {r['step']} {k}: {r[k]!r} vs golden {g[k]!r}" for r, g in zip(rows, golden) for k in keys
            if not math.isclose(r[k], g[k], rel_tol=RTOL, abs_tol=ATOL)]


def test_split_staleness0_reproduces_the_colocated_run(runs):
    rows = runs["s0"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert not _mismatches(rows, _golden())
    assert [r["rollout/staleness"] for r in rows] == [0] * 5
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)  # generated with the weights trained from
    assert all(r["sync/bytes"] > 0 for r in rows[1:])  # the weights went out every step after the first


def test_split_staleness1_trains_on_batches_one_step_behind(runs):
    rows = runs["s1"]
    assert [r["rollout/weight_version"] for r in rows] == [0, 0, 1, 2]  # batch k: the weights after step k-2
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1, 1]
    assert not _mismatches(rows[:1], _golden())  # step 1: both runs sample and train from the initial weights
    assert rows[0]["rollout/logprob_diff_max"] < 1e-4
    # later batches were sampled by the weights one update before those that compute the old log-probs
    assert all(r["rollout/logprob_diff_max"] > 1e-2 for r in rows[1:])
    # and differ from the on-policy run's from step 2 on (same prompts and seeds, other weights)
    assert _mismatches(rows[1:2], _golden()[1:2], ("reward/mean", "actor/loss"))


def test_split_staleness1_resume_continues_exactly(runs, tmp_path):
    ckpt = runs["s1_dir"] / "checkpoints" / "step_00000002"  # saved while batch 3 was in flight
    p = _start(tmp_path, "resumed", "trainer.max_steps=4", "async_training.staleness=1", f"trainer.resume={ckpt}")
    rows = _rows(p, tmp_path / "run")
    assert "resumed from" in p.log_path.read_text()
    assert [r["step"] for r in rows] == [3, 4]
    for got, want in zip(rows[2:], runs["s1"][2:]):
        for k in KEYS + ("rollout/weight_version",):
            assert got[k] == want[k], (got["step"], k, got[k], want[k])
