"""Against a real Slurm (single node `localhost`, brought up by `.ci/slurm_up.sh`): a job whose
ranks read their position with mcore_rl.distributed.env, and the sbatch scripts in slurm/ as
shipped, each running the real program: the trainer on the toy task with 2 CPU ranks
(train.sbatch with both launchers, SIGTERM -> checkpoint -> requeue -> resume;
multinode_tp_pp.sbatch at TP=2 and at PP=2) and the converter (convert.sbatch).

The `slurm_cluster` fixture is reusable: `slurm_cluster.run(script, args, env=..., opts=...)`
submits, polls `scontrol show job` (no accounting, so no sacct) and returns a `JobResult`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class JobResult:
    job_id: str
    state: str  # final Slurm JobState, e.g. COMPLETED
    exit_code: str  # "rc:signal" as Slurm reports it
    restarts: int
    stdout: Path
    fields: dict

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == "0:0"

    def log(self) -> str:
        return self.stdout.read_text(errors="replace") if self.stdout.exists() else f"(no log at {self.stdout})"


class SlurmCluster:
    """Submit jobs to the local test cluster and wait for them."""

    def __init__(self, workdir: Path):
        self.workdir = workdir

    def env(self, extra: dict | None = None) -> dict:
        """The submitting environment: ours, minus any SLURM_* of an enclosing job, plus the
        repo on PYTHONPATH and this interpreter as PYTHON (sbatch exports it to the job)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHON"] = sys.executable
        env["MCORE_RL_ROOT"] = str(REPO)
        env.update(extra or {})
        return env

    def submit(self, script: str | Path, args: list[str] = (), env: dict | None = None, opts: list[str] = ()) -> str:
        """sbatch `script` (a path, or the text of a script) and return the job id."""
        if not Path(str(script)).is_file():
            path = self.workdir / f"job_{time.monotonic_ns()}.sbatch"
            path.write_text(str(script))
            script = path
        cmd = ["sbatch", "--parsable", f"--output={self.workdir}/slurm-%j.out", f"--chdir={self.workdir}",
               *opts, str(script), *args]
        out = subprocess.run(cmd, env=self.env(env), capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def show(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: str, timeout: float = 120, until=None) -> JobResult:
        """Poll until the job reaches a terminal state (or `until(fields)` is true)."""
        deadline = time.monotonic() + timeout
        fields: dict = {}
        while time.monotonic() < deadline:
            fields = self.show(job_id) or fields
            state = fields.get("JobState", "")
            if (until is not None and until(fields)) or (until is None and state in TERMINAL):
                return self._result(job_id, fields)
            time.sleep(0.3)
        subprocess.run(["scancel", job_id], capture_output=True)
        res = self._result(job_id, fields)
        raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout}s; log:\n{res.log()}")

    def _result(self, job_id: str, fields: dict) -> JobResult:
        return JobResult(job_id=job_id, state=fields.get("JobState", "UNKNOWN"), exit_code=fields.get("ExitCode", ""),
                         restarts=int(fields.get("Restarts", 0) or 0),
                         stdout=Path(fields.get("StdOut") or self.workdir / f"slurm-{job_id}.out"), fields=fields)

    def run(self, script, args=(), env=None, opts=(), timeout: float = 120) -> JobResult:
        return self.wait(self.submit(script, args, env, opts), timeout=timeout)


def _cluster_up() -> str | None:
    """None when usable, else why not."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "Slurm client tools (sbatch) not on PATH: run `bash .ci/slurm_up.sh` as root"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed ({e}): run `bash .ci/slurm_up.sh`"
    states = {s.strip().rstrip("*~#!%$@^-") for s in out.stdout.split()}
    if out.returncode != 0 or not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no Slurm node is up (sinfo: {out.stdout.strip() or out.stderr.strip()}): run `bash .ci/slurm_up.sh`"
    return None


@pytest.fixture
def slurm_cluster(tmp_path):
    why = _cluster_up()
    if why:
        pytest.skip(why)
    return SlurmCluster(tmp_path)


def test_srun_two_tasks_read_launch_env(slurm_cluster, tmp_path):
    """srun without torchrun: each task's env.py view is rank i of world 2 on node localhost."""
    out = tmp_path / "ranks"
    out.mkdir()
    script = f"""#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --time=2
srun "$PYTHON" -c '
import json
from mcore_rl.distributed.env import read_launch_env
e = read_launch_env()
json.dump(dict(e.__dict__, hostnames=list(e.hostnames)), open("{out}/rank%d.json" % e.rank, "w"))
'
"""
    res = slurm_cluster.run(script, timeout=60)
    assert res.ok, f"{res.state} {res.exit_code}\n{res.log()}"
    recs = {int(f.stem[4:]): json.loads(f.read_text()) for f in out.glob("rank*.json")}
    assert sorted(recs) == [0, 1], res.log()
    port = 20000 + int(res.job_id) % 10000
    for rank, e in recs.items():
        assert (e["rank"], e["world_size"], e["local_rank"], e["local_world_size"]) == (rank, 2, rank, 2)
        assert (e["node_rank"], e["num_nodes"], e["launcher"]) == (0, 1, "slurm")
        assert (e["master_addr"], e["master_port"], e["hostnames"], e["job_id"]) == ("localhost", port, ["localhost"], res.job_id)


def test_convert_sbatch_round_trip(slurm_cluster, tmp_path, tiny_model_factory):
    """convert.sbatch as CPU jobs: HF -> Megatron at TP=2 (the converter spawns its 2 ranks),
    then back to HF; every tensor bit-identical to the original."""
    from safetensors.torch import load_file

    hf = Path(tiny_model_factory("llama"))
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    opts = ["--time=5", "--cpus-per-task=2", "--mem=4G"]
    env = {"OMP_NUM_THREADS": "1"}
    res = slurm_cluster.run(REPO / "slurm/convert.sbatch", ["--hf-path", str(hf), "--out", str(mcore), "--tp", "2"],
                            env=env, opts=opts, timeout=180)
    assert res.ok and (mcore / "mcore_rl.json").exists(), f"{res.state} {res.exit_code}\n{res.log()}"
    res = slurm_cluster.run(REPO / "slurm/convert.sbatch", ["mcore-to-hf", "--mcore-path", str(mcore), "--out", str(back)],
                            env=env, opts=opts, timeout=180)
    assert res.ok, f"{res.state} {res.exit_code}\n{res.log()}"

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(hf), tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sbatch_scripts_parse():
    for script in sorted((REPO / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH" in text


# ------------------------------------------------------------------------------ the real toy run
# Every job below runs the real trainer (`python -m mcore_rl.commands.train`, started by
# slurm/train.sbatch) on the built-in toy task: 2 CPU ranks, a small batch, a few steps.
# 32 prompts a step, mini-batches of 16, micro-batches of 8: divisible at DP=1 and DP=2.
SMALL = ["actor_rollout_ref.actor.ppo_mini_batch_size=16", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
         "critic.ppo_micro_batch_size_per_gpu=8"]


def _toy_job(out: Path, launcher: str | None, steps: int, *extra: str, batch: int = 64) -> tuple[dict, list[str], list[str]]:
    """(environment, sbatch options, trainer overrides) of a 2-rank CPU toy run into `out` of
    `steps` steps of `batch` prompts; launcher None: the scripts' default (torchrun)."""
    env = {"MCORE_RL_NPROC_PER_NODE": "2", "MCORE_RL_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    if launcher:
        env["MCORE_RL_LAUNCHER"] = launcher
    opts = ["--gpus-per-node=0", "--time=10"] + (["--ntasks-per-node=2"] if launcher == "srun" else [])
    args = [f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.logger=[console]",
            f"data.train_batch_size={batch}", "trainer.export_hf_at_end=false", *extra]
    return env, opts, args


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in _rows(out)]


def _check_toy_run(out: Path, steps: int, batch: int, log: str) -> dict:
    """A finished toy run of `steps` steps at `batch` prompts per step (rollout.n=1): one metrics
    row per step, every value finite, no skipped update, rewards that are toy scores, and the
    final checkpoint complete. Returns that checkpoint's trainer_state.json."""
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), log
    for r in rows:
        bad = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not math.isfinite(v)}
        assert not bad, (r["step"], bad)
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "actor/entropy"):
            assert key in r, (key, r)
        assert r["actor/skipped_updates"] == 0 and r["critic/skipped_updates"] == 0, r
        # A toy sample scores k/8 (k of its 8 response characters repeat the prompt's digit), so
        # the batch's rewards lie in [0, 1] and their mean is a multiple of 1/(8 x batch).
        lo, mean, hi = r["reward/min"], r["reward/mean"], r["reward/max"]
        assert 0.0 <= lo <= mean <= hi <= 1.0, r
        for value, denom in ((lo, 8), (hi, 8), (mean, 8 * batch)):
            assert abs(value * denom - round(value * denom)) < 1e-6, (r["step"], value, denom)
    last = f"step_{steps:08d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == last
    ckpt = out / "checkpoints" / last
    for model in ("actor", "critic"):
        for part in ("model", "optim"):
            assert (ckpt / model / part / "metadata.json").is_file(), f"{ckpt / model / part} incomplete"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == steps and state["loader"]["position"] == steps, state
    return state


@pytest.mark.parametrize("sizes", [{"TP": "2", "PP": "1"}, {"TP": "1"}], ids=["tp2", "pp2-default"])
def test_multinode_tp_pp_sbatch_trains_on_one_node(slurm_cluster, tmp_path, sizes):
    """slurm/multinode_tp_pp.sbatch shrunk to one node of 2 CPU ranks (TP=2; or TP=1 with the
    script's default PP=2): every override it adds (actor TP/PP, rollout TP = TP, nodes x ranks
    per node) is accepted by the trainer, which trains 2 steps at that layout and checkpoints."""
    out = tmp_path / "run"
    env, opts, args = _toy_job(out, None, 2, *SMALL, batch=32)
    env.update(sizes)
    tp, pp = int(sizes["TP"]), int(sizes.get("PP", 2))
    res = slurm_cluster.run(REPO / "slurm/multinode_tp_pp.sbatch", args, env=env, opts=["--nodes=1", *opts], timeout=360)
    log = res.log()
    assert res.ok, f"{res.state} {res.exit_code}\n{log}"
    assert f"TP {tp} x PP {pp} x DP 1, rollout TP {tp}" in log, log
    state = _check_toy_run(out, 2, 32, log)
    assert state["layout"] == {"tp": tp, "pp": pp, "dp": 1, "world": 2}, state
    cfg = state["config"]
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"]) == (1, 2)
    assert cfg["actor_rollout_ref"]["rollout"]["tensor_model_parallel_size"] == tp
    assert json.loads((out / "checkpoints/step_00000002/actor/mcore_rl.json").read_text())["written_at"]["tp"] == tp


def test_multinode_tp_pp_sbatch_rejects_bad_sizes(slurm_cluster, tmp_path):
    """TP=4 on a node of 2 ranks: the script stops (exit 2) with the numbers before starting the trainer."""
    out = tmp_path / "run"
    env, opts, args = _toy_job(out, None, 2, *SMALL, batch=32)
    env.update(TP="4", PP="1")
    res = slurm_cluster.run(REPO / "slurm/multinode_tp_pp.sbatch", args, env=env, opts=["--nodes=1", *opts], timeout=60)
    log = res.log()
    assert res.state == "FAILED" and res.exit_code == "2:0", f"{res.state} {res.exit_code}\n{log}"
    assert "TP=4 must divide the 2 GPUs per node" in log, log
    assert "== entry:" not in log and not out.exists(), log


@pytest.mark.parametrize("how", ["time-limit SIGTERM (torchrun)", "preemption requeue (srun)"])
def test_train_sbatch_interrupted_requeues_and_resumes(slurm_cluster, tmp_path, how):
    """sbatch slurm/train.sbatch on the toy task, 2 CPU ranks (DP=2), with each launcher, and
    interrupted mid-run: either the time-limit warning (SIGTERM to the batch shell, which
    forwards it; the trainer checkpoints and the script requeues) or a preemption (`scontrol
    requeue`: Slurm itself terminates and requeues the job). The restarted job resumes from
    the newest checkpoint, completes, and its metrics file has every step exactly once. The
    overrides given to sbatch reach the trainer, with trainer.resume=auto appended."""
    out = tmp_path / "run"
    launcher = "torchrun" if "torchrun" in how else "srun"
    env, opts, args = _toy_job(out, launcher, 6, "trainer.save_freq=1", "data.seed=7")
    job = slurm_cluster.submit(REPO / "slurm/train.sbatch", args, env=env, opts=opts)
    deadline = time.monotonic() + 240
    while len(_steps(out)) < 2:
        assert time.monotonic() < deadline, "the job never reached step 2:\n" + slurm_cluster._result(job, {}).log()
        time.sleep(0.2)
    if launcher == "torchrun":
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True, timeout=30)
    else:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    res = slurm_cluster.wait(job, timeout=400, until=lambda f: f.get("JobState") == "COMPLETED"
                             or (f.get("JobState") in TERMINAL and int(f.get("Restarts", 0) or 0) >= 1))
    log = res.log()
    assert res.ok and res.restarts == 1, f"{res.state} {res.exit_code} restarts={res.restarts}\n{log}"
    assert "resumed from" in log, log
    if launcher == "torchrun":
        assert "SIGTERM: stopped after step" in log and "requeueing job" in log, log
    assert f"2 rank(s)/node via {launcher}" in log, log
    assert f"== entry: -m mcore_rl.commands.train {' '.join(args)} trainer.resume=auto" in log, log
    assert "TP=1 PP=1 DP=2" in log and "Training completed" in log, log
    state = _check_toy_run(out, 6, 64, log)
    assert state["layout"] == {"tp": 1, "pp": 1, "dp": 2, "world": 2}, state
    assert state["config"]["data"]["seed"] == 7 and state["loader"]["seed"] == 7, state


def test_train_sbatch_split_placement_with_srun(slurm_cluster, tmp_path):
    """slurm/train.sbatch with the srun launcher (one Slurm task per rank, no torchrun) in split
    placement, one step off-policy: task 0 trains, task 1 only generates. Without torchrun's
    agent, rank 0 hosts the rendezvous store both sides' groups and the bridge are built on; at
    the end both sides leave together and the job completes."""
    out = tmp_path / "run"
    env, opts, args = _toy_job(out, "srun", 3, *SMALL, "actor_rollout_ref.rollout.placement=split",
                               "actor_rollout_ref.rollout.n_gpus=1", "async_training.staleness=1", batch=32)
    res = slurm_cluster.run(REPO / "slurm/train.sbatch", args, env=env, opts=opts, timeout=360)
    log = res.log()
    assert res.ok, f"{res.state} {res.exit_code}\n{log}"
    assert "2 rank(s)/node via srun" in log and "1 rank(s) train, 1 generate" in log, log
    state = _check_toy_run(out, 3, 32, log)
    assert state["layout"]["world"] == 1, state  # the training side's world
    assert [r["rollout/staleness"] for r in _rows(out)] == [0, 1, 1]
