"""Split placement on CPU: `mcore-rl train` under torchrun on gloo ranks, some that only train and
some that only run the vLLM engine (`rollout.placement=split rollout.n_gpus=N`).

- staleness 0 reproduces the colocated run: the 1-rank golden curve of the toy GRPO task
  (tests/golden/toy_grpo.jsonl, committed from a colocated run) within the golden tolerance;
- staleness 1: batch k is generated with the weights after step k-2 (one step behind the
  weights it is trained from): step 1 is the golden step 1 (both use the initial weights), from
  step 2 on the rollout log-probs differ from the trainer's by an update's worth;
- validation (both runs validate) runs on the rollout ranks and changes no batch;
- rollout TP 2 reads only its part of the weights, also of a model with one key/value head;
- SIGTERM to every process of a staleness-1 run (as Slurm sends it): the training ranks finish the
  step, save a checkpoint with the batch that was in flight, the rollout rank waits for their word;
  the resumed run continues exactly;
- the bad-step policy: non-finite losses stop the training ranks (exit 3), which tell the rollout
  rank to stop first: the job ends, nothing left waiting.
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

pytestmark = pytest.mark.train

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "toy_grpo.jsonl"
RTOL, ATOL = 1e-3, 1e-5  # the golden tolerance (tests/test_golden.py)
KEYS = ("reward/mean", "reward/max", "reward/min", "response/length_mean", "actor/loss", "actor/pg_loss",
        "actor/kl", "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "actor/kl_loss")
SPLIT = [str(REPO / "configs" / "toy_grpo.yaml"), "actor_rollout_ref.rollout.placement=split",
         "actor_rollout_ref.rollout.n_gpus=1", "actor_rollout_ref.rollout.name=vllm", "trainer.logger=[console]",
         "trainer.export_hf_at_end=false", "trainer.dist_timeout_s=120"]


def _start(tmp: Path, name: str, *args: str, script: Path | None = None, nproc: int = 3) -> subprocess.Popen:
    # a temp dir with a short path: vLLM's Unix sockets (rollout TP > 1) may not exceed 107 bytes,
    # which one under a test's tmp_path can under pytest-xdist
    short = tempfile.mkdtemp(prefix="mcore_rl_split_")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               TMPDIR=short)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = open(tmp / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *([str(script)] if script else ["-m", "mcore_rl.cli", "train"]), *SPLIT, f"trainer.output_dir={tmp / 'run'}",
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path, proc.tmpdir = tmp / f"{name}.log", short
    return proc


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        shutil.rmtree(proc.tmpdir, ignore_errors=True)


def _rows(proc: subprocess.Popen, out: Path, rc: int | None = 0) -> list[dict]:
    got = _wait(proc)
    if rc is not None:
        assert got == rc, f"split run exited {got}:\n{proc.log_path.read_text()[-6000:]}"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


VAL = ["data.val_files=toy", "trainer.test_freq=2"]  # and val_before_train (the default)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Started at once, both validating: staleness 0 on 4 ranks (2 train at PP=2, 2 run one vLLM
    engine of TP 2), 5 steps, exporting the actor; staleness 1 on 3 ranks (2 train at DP=2, 1
    generates), 4 steps. {run: its training rows, run/val: its validation rows}."""
    if torch.cuda.is_available():
        pytest.skip("CPU runs (the golden curve is the CPU's)")
    t0, t1 = tmp_path_factory.mktemp("split0"), tmp_path_factory.mktemp("split1")
    p0 = _start(t0, "s0", "trainer.max_steps=5", "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=2",
                "actor_rollout_ref.rollout.n_gpus=2", "actor_rollout_ref.rollout.tensor_model_parallel_size=2", *VAL,
                "trainer.export_hf_at_end=true", nproc=4)
    p1 = _start(t1, "s1", "trainer.max_steps=4", "async_training.staleness=1", *VAL)
    out = {"s0/dir": t0 / "run"}
    for name, p, t in (("s0", p0, t0), ("s1", p1, t1)):
        rows = _rows(p, t / "run")
        out[name] = [r for r in rows if "actor/loss" in r]
        out[f"{name}/val"] = [r for r in rows if "val/reward/mean@1" in r]
    return out


def _golden() -> list[dict]:
    return [json.loads(line) for line in GOLDEN.read_text().splitlines() if line]


def _mismatches(rows: list[dict], golden: list[dict], keys=KEYS) -> list[str]:
    return [f"step {r['step']} {k}: {r[k]!r} vs golden {g[k]!r}" for r, g in zip(rows, golden) for k in keys
            if not math.isclose(r[k], g[k], rel_tol=RTOL, abs_tol=ATOL)]


def test_split_staleness0_reproduces_the_colocated_run(runs):
    """(With validations at steps 0, 2, 4 and 5: they change no batch.)"""
    rows = runs["s0"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert not _mismatches(rows, _golden())
    assert [r["rollout/staleness"] for r in rows] == [0] * 5
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)  # generated with the weights trained from
    # The weights of step k-1 go out before step k's batch, unless a validation at step k-1 sent them
    # (steps 1, 3, 5: a header alone); rollout TP rank 0 receives its part of the model only
    model, rank0 = _toy_bytes_at_rollout_tp2()
    assert [r.get("sync/bytes") for r in rows] == [None, model, None, model, None]
    assert [r["rollout/sync_bytes"] for r in rows] == [0, rank0, 0, rank0, 0]


def test_split_validation_runs_on_the_rollout_ranks(runs):
    """Validation rows at step 0, every test_freq steps and the last, computed by the rollout
    engines: at step 0 the greedy reward of the initial model (both runs), at the last step that of
    the exported actor, as plain transformers decoding finds them (`test_validation._greedy_reference`).
    That the batches stay a run's without validation: the golden curve (staleness 0) and the
    SIGTERM test's uninterrupted run (staleness 1, compared with a run without validation)."""
    from test_validation import _greedy_reference

    s0, s1 = runs["s0/val"], runs["s1/val"]
    assert [r["step"] for r in s0] == [0, 2, 4, 5] and [r["step"] for r in s1] == [0, 2, 4]
    for row, model in ((s0[0], runs["s0/dir"] / "toy_model"), (s1[0], runs["s0/dir"] / "toy_model"),
                       (s0[-1], runs["s0/dir"] / "hf_model")):
        reward, length = _greedy_reference(str(model))
        assert math.isclose(row["val/reward/mean@1"], reward, abs_tol=1e-9), (row, reward)
        assert math.isclose(row["val/response/length_mean"], length, abs_tol=1e-9), (row, length)
    assert s0[0]["val/reward/mean@1"] != s0[-1]["val/reward/mean@1"]  # the actor trained in between


def _toy_bytes_at_rollout_tp2() -> tuple[int, int]:
    """Bytes of the toy model (fp32), and of what rank 0 of a TP-2 engine reads of it: half of
    every linear, every norm, and the vocabulary rows vLLM gives it (the rows padded to 64, then
    halved: rows 0-31 hold all 15)."""
    from mcore_rl.toy import TOY_MODEL_CONFIG, TOY_VOCAB

    c = TOY_MODEL_CONFIG
    h, layers, v = c["hidden_size"], c["num_hidden_layers"], len(TOY_VOCAB)
    assert c["num_key_value_heads"] == c["num_attention_heads"] and not c["tie_word_embeddings"]
    linears = layers * (4 * h * h + 3 * h * c["intermediate_size"])
    rest = (2 * layers + 1) * h + 2 * v * h  # norms, embedding and output layer
    return 4 * (linears + rest), 4 * (linears // 2 + rest)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_rollout_parts_are_what_vllm_loads(tp):
    """`rollout_part` for a Qwen2.5-1.5B-shaped model (12 heads, 2 key/value heads, a vocabulary
    that vLLM pads): the parts of all TP ranks tile each tensor the way vLLM's layers split it:
    vocabulary rows by vLLM's own range function, key/value heads replicated beyond 2 ranks."""
    from vllm.model_executor.layers.vocab_parallel_embedding import pad_vocab_size, vocab_range_from_global_vocab_size

    from converters.mapping import NameIndex, rollout_part
    from mcore_rl.models.arch import ArchSpec

    spec = ArchSpec("qwen2", "Qwen2ForCausalLM", num_layers=1, hidden_size=1536, ffn_hidden_size=8960,
                    num_attention_heads=12, num_query_groups=2, head_dim=128, vocab_size=151_665,
                    max_position_embeddings=32, qkv_bias=True)
    index, d = NameIndex(spec), 128
    shapes = {"model.embed_tokens.weight": (151_665, 1536), "lm_head.weight": (151_665, 1536),
              "model.layers.0.self_attn.q_proj.weight": (1536, 1536), "model.layers.0.self_attn.k_proj.bias": (256,),
              "model.layers.0.self_attn.v_proj.weight": (256, 1536), "model.layers.0.self_attn.o_proj.weight": (1536, 1536),
              "model.layers.0.mlp.up_proj.weight": (8960, 1536), "model.layers.0.mlp.down_proj.weight": (1536, 8960),
              "model.layers.0.input_layernorm.weight": (1536,)}
    for name, shape in shapes.items():
        rule, layer = index.hf(name)
        part = rule.hf_names(layer).index(name)
        got = [rollout_part(rule, part, torch.Size(shape), spec, r, tp) for r in range(tp)]
        if tp == 1 or name.endswith("layernorm.weight"):
            assert got == [None] * tp, name
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            want = [vocab_range_from_global_vocab_size(pad_vocab_size(shape[0]), r, tp) for r in range(tp)]
            want = [(0, min(a, shape[0]), min(b, shape[0]) - min(a, shape[0])) for a, b in want]
            assert got == want, name
        elif ("k_proj" in name or "v_proj" in name) and tp > 2:
            assert got == [(0, r // (tp // 2) * d, d) for r in range(tp)], name  # heads replicated
        else:
            dim = 1 if "o_proj" in name or "down_proj" in name else 0
            n = shape[dim] // tp
            assert got == [(dim, r * n, n) for r in range(tp)], name


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


def test_split_with_a_lora_actor_reproduces_the_colocated_lora_run(tmp_path):
    """LoRA on the actor, split placement (2 training ranks at DP=2, 1 rollout rank), staleness 0: the
    rollout rank receives the merged weights every step and the run follows the colocated LoRA run's
    golden curve (tests/golden/toy_grpo_lora.jsonl)."""
    from test_lora import TOY_LORA

    if torch.cuda.is_available():
        pytest.skip("CPU runs (the golden curve is the CPU's)")
    rows = _rows(_start(tmp_path, "lora", *TOY_LORA), tmp_path / "run")
    golden = [json.loads(line) for line in (GOLDEN.parent / "toy_grpo_lora.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert not _mismatches(rows, golden)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)  # the engine's policy is the actor's, merged


def test_split_rollout_tp2_reads_a_replicated_kv_head_and_tied_embeddings(tmp_path):
    """A toy model with one key/value head and tied embeddings; 1 training rank and one engine of
    rollout TP 2: both rollout ranks are sent the one key/value head (vLLM replicates it) and no
    output layer. Every step the engine's log-probs equal the actor's (NaN does not compare)."""
    from mcore_rl.toy import build_toy_model

    if torch.cuda.is_available():
        pytest.skip("CPU run")
    model = build_toy_model(tmp_path / "gqa", num_key_value_heads=1, tie_word_embeddings=True)
    rows = _rows(_start(tmp_path, "gqa", f"actor_rollout_ref.model.path={model}", "trainer.max_steps=3",
                        "actor_rollout_ref.rollout.n_gpus=2", "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
                        "actor_rollout_ref.actor.optim.lr=1e-2"), tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows), [r["rollout/logprob_diff_max"] for r in rows]
    assert rows[0]["reward/mean"] != rows[-1]["reward/mean"] or rows[0]["actor/loss"] != rows[-1]["actor/loss"]


def test_split_sigterm_saves_the_batch_in_flight_and_resumes_exactly(runs, tmp_path):
    out = tmp_path / "run"
    proc = _start(tmp_path, "terminated", "trainer.max_steps=4", "async_training.staleness=1")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, "no step 1"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as Slurm signals a job step
    _wait(proc)
    log = proc.log_path.read_text()
    assert "SIGTERM: stopped after step" in log, log[-4000:]
    assert "generating until the training ranks stop" in log  # the rollout rank waited for their word
    stopped = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 1 <= stopped < 4, log[-3000:]
    p = _start(tmp_path, "resumed", "trainer.max_steps=4", "async_training.staleness=1")
    rows = _rows(p, out)
    assert f"step {stopped}, saved at" in p.log_path.read_text()
    assert [r["step"] for r in rows] == list(range(1, 5))
    for got, want in zip(rows, runs["s1"]):  # the steps before and after the stop: the uninterrupted run's
        for k in KEYS + ("rollout/weight_version",):
            assert got[k] == want[k], (got["step"], k, got[k], want[k])


NAN_LOSS = r'''
import sys
import mcore_rl.trainer.ppo_update as ppo_update
original = ppo_update.policy_loss
def nan_loss(*args, **kwargs):
    loss, metrics = original(*args, **kwargs)
    return loss * float("nan"), metrics
ppo_update.policy_loss = nan_loss
if __name__ == "__main__":
    from mcore_rl.commands.train import main
    sys.exit(main(sys.argv[1:]))
'''


def test_split_bad_steps_stop_both_sides(tmp_path):
    script = tmp_path / "nan_loss.py"
    script.write_text(NAN_LOSS)
    p = _start(tmp_path, "nan", "trainer.max_steps=6", "trainer.max_bad_steps=2", "async_training.staleness=1",
               script=script)
    rows = _rows(p, tmp_path / "run", rc=None)
    log = p.log_path.read_text()
    assert p.returncode != 0 and "stopping: 2 steps in a row with a non-finite loss" in log, log[-4000:]
    assert [r["step"] for r in rows] == [1, 2] and all(r["actor/skipped_updates"] > 0 for r in rows)
    assert "exitcode  : 3" in log  # the training ranks' exit code (torchrun's own is 1); nothing hung
