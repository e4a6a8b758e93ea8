"""Golden curves: the CPU toy runs' per-step metrics, pinned to committed values.

`mcore-rl train` runs as a user runs it on the toy task (tiny Llama, fp32, vLLM on CPU, one
thread); the first 5 steps are pinned:

- GRPO: ``mcore-rl train configs/toy_grpo.yaml`` (KL loss to the reference, no critic), 5 steps;
- PPO:  ``mcore-rl train`` (the toy default, configs/toy.yaml: critic, KL in the reward): conftest's
  `toy_default_run`, its full 20 steps, which tests/test_trainer.py also checks (the constant
  learning rate makes its first 5 steps those of a 5-step run).
- GRPO with LoRA adapters (tests/test_lora.py, ``toy_grpo_lora.jsonl``), with the helpers here.

Every step's metrics in `GOLDEN_KEYS` must match ``tests/golden/toy_{grpo,ppo}.jsonl`` within
``rel_tol=RTOL, abs_tol=ATOL``. The runs are bit-identical from run to run and at 1 or 2 threads
(vLLM samples with per-prompt seeds; the trainer seeds everything else), so the tolerance only
has to absorb floating-point differences between CPUs (kernels, reduction order). Multiplying the
initial weights by 1 + 1e-6 * N(0, 1), more than such differences, changed no sampled token and no
metric by more than an eighth of the tolerance. A KL term of coefficient 0.001 dropped from the loss or
the reward moves the curves by 0.5-1% (fails at step 1 or 2); a no-op update, a flipped
policy-gradient sign or a response mask shifted by one token fail at step 1 by far more.

The two runs start together, one thread each (the 2 cores of CI): about a minute in all.

Regenerate on purpose, after a change that is meant to move the curves:

    MCORE_RL_UPDATE_GOLDEN=1 pytest -n 0 tests/test_golden.py tests/test_lora.py

rewrites the files and prints each value that changed next to the old one (``*`` where it moved
beyond the tolerance; `-n 0`: a pytest-xdist worker's prints are not shown); review that diff
before committing the new files.
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

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("MCORE_RL_UPDATE_GOLDEN") == "1"
STEPS = 5
RTOL, ATOL = 1e-3, 1e-5
RUNS = {
    "grpo": [str(REPO / "configs" / "toy_grpo.yaml")],
    "ppo": [],  # no config: the toy default, conftest's `toy_default_run`
}
COMMON = ("reward/mean", "reward/max", "reward/min", "response/length_mean", "response/clip_ratio",
          "actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl",
          "actor/grad_norm", "actor/skipped_updates")
GOLDEN_KEYS = {
    "grpo": COMMON + ("actor/kl_loss",),
    "ppo": COMMON + ("critic/loss", "critic/vf_clipfrac", "critic/grad_norm", "critic/skipped_updates"),
}


def _env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TMPDIR=str(tmp))  # vLLM's socket files: one directory per run
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def start_train(args: list[str], tmp: Path) -> subprocess.Popen:
    """``mcore-rl train ARGS`` on the toy setup of the golden runs (vLLM, one thread), output under `tmp`."""
    args = [*args, "actor_rollout_ref.rollout.name=vllm", "trainer.logger=[console]", "trainer.export_hf_at_end=false",
            f"trainer.output_dir={tmp / 'run'}"]
    log = open(tmp / "log.txt", "w")  # a file, not a pipe: two runs at once never block on a full pipe
    proc = subprocess.Popen([sys.executable, "-m", "mcore_rl.cli", "train", *args], cwd=REPO, env=_env(tmp),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.tmp, proc.log = tmp, log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[list[dict], str]:
    """Wait for a `start_train` run: (its metrics rows, its console log); fails if it failed."""
    rc = proc.wait(timeout=timeout)
    proc.log.close()
    log = (proc.tmp / "log.txt").read_text()
    assert rc == 0, f"mcore-rl train exited {rc}:\n{log[-5000:]}"
    return [json.loads(line) for line in (proc.tmp / "run" / "metrics.jsonl").read_text().splitlines() if line], log


def _start(algo: str, tmp: Path) -> subprocess.Popen:
    return start_train(RUNS[algo] + [f"trainer.max_steps={STEPS}"], tmp)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected algorithms' runs, started at once; `runs[algo]()` waits for one and returns its rows."""
    if torch.cuda.is_available():
        pytest.skip("the golden curves are the CPU runs' (vLLM would generate on the GPU)")
    wanted = {item.callspec.params["algo"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
    toy_default = request.getfixturevalue("toy_default_run") if "ppo" in wanted else None
    procs = {algo: _start(algo, tmp_path_factory.mktemp(f"golden_{algo}")) for algo in RUNS
             if algo in wanted and algo != "ppo"}

    def result(algo: str) -> list[dict]:
        if algo == "ppo":
            return toy_default()[0][:STEPS]
        return finish(procs[algo])[0]

    yield result
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def _close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL)


def _diff(old: list[dict], new: list[dict], keys) -> str:
    """The values that changed, old -> new; `*` marks a change beyond the tolerance."""
    before = {r["step"]: r for r in old}
    lines = []
    for n in new:
        o = before.get(n["step"], {})
        for k in keys:
            a, b = o.get(k), n[k]
            if a != b:
                mark = "*" if a is None or not _close(b, a) else " "
                lines.append(f"{mark} step {n['step']} {k:24} {a!r:>24} -> {b!r}")
    return "\n".join(lines) or "(no value changed)"


@pytest.mark.parametrize("algo", list(RUNS))
def test_toy_run_matches_golden_curve(algo, runs, capsys):
    rows = runs(algo)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    check_golden(f"toy_{algo}", rows, GOLDEN_KEYS[algo], capsys)
    assert all(MISMATCH_KEYS <= set(r) for r in rows)  # the engine's log-probs are compared by default


MISMATCH_KEYS = {"rollout/logprob_diff_max", "mismatch/kl", "mismatch/k3_kl"}


def test_toy_grpo_without_rollout_log_probs_is_the_same_run(tmp_path):
    """`rollout.calculate_log_probs=false` only stops the engine returning log-probs: the samples
    (per-prompt seeds) and the updates are the golden run's, and the metrics that compare the
    engine's log-probs with the actor's are left out rather than computed from zeros."""
    if torch.cuda.is_available():
        pytest.skip("the golden curves are the CPU runs'")
    steps = 2
    rows, _ = finish(start_train(RUNS["grpo"] + [f"trainer.max_steps={steps}",
                                                 "actor_rollout_ref.rollout.calculate_log_probs=false"], tmp_path))
    golden = [json.loads(line) for line in (GOLDEN / "toy_grpo.jsonl").read_text().splitlines() if line][:steps]
    assert [r["step"] for r in rows] == [g["step"] for g in golden]
    bad = [f"step {g['step']} {k}: golden {g[k]!r}, got {r[k]!r}"
           for g, r in zip(golden, rows) for k in GOLDEN_KEYS["grpo"] if not _close(r[k], g[k])]
    assert not bad, "\n".join(bad)
    assert not any(k in MISMATCH_KEYS or k.startswith("mismatch/") for r in rows for k in r), sorted(rows[0])


def check_golden(name: str, rows: list[dict], keys, capsys) -> None:
    """`rows`' `keys` against ``tests/golden/NAME.jsonl`` (rewritten instead with MCORE_RL_UPDATE_GOLDEN=1)."""
    path = GOLDEN / f"{name}.jsonl"
    new = [{"step": r["step"], **{k: r[k] for k in keys}} for r in rows]
    if UPDATE:
        old = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in new))
        with capsys.disabled():
            print(f"\n{path.relative_to(REPO)} rewritten:\n{_diff(old, new, keys)}")
        return
    golden = [json.loads(line) for line in path.read_text().splitlines() if line]
    assert [g["step"] for g in golden] == [r["step"] for r in rows]
    bad = [f"step {g['step']} {k}: golden {g[k]!r}, got {r[k]!r}"
           for g, r in zip(golden, rows) for k in keys if not _close(r[k], g[k])]
    assert not bad, (f"{name}: {len(bad)} metric(s) off the golden curve (rel {RTOL}, abs {ATOL}); if the change is "
                     "meant, rerun with MCORE_RL_UPDATE_GOLDEN=1\n" + "\n".join(bad))
