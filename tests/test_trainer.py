"""The trainer end to end, as a user runs it (`mcore-rl train`, torchrun), on CPU."""

import json
import os
import subprocess
import sys

import pytest

from dist_utils import free_port

pytestmark = pytest.mark.train
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
# A small, fast configuration shared by the layout and backend runs.
SMALL = ["data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=16",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "critic.ppo_micro_batch_size_per_gpu=8",
         "trainer.logger=[console]"]


def train(tmp, args, nproc=1, timeout=420):
    out = os.path.join(tmp, "run")
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                 "-m", "mcore_rl.commands.train"] if nproc > 1 else [sys.executable, "-m", "mcore_rl.cli", "train"])
    r = subprocess.run(launcher + list(args) + [f"trainer.output_dir={out}"], capture_output=True, text=True,
                       timeout=timeout, env={**ENV, "TMPDIR": str(tmp)})
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return rows, r.stdout


def test_toy_default_reward_rises(toy_default_run):
    """`mcore-rl train` with no config: the reward really climbs (last 3 vs first 3 steps). The run
    is conftest's `toy_default_run`, whose first steps tests/test_golden.py also pins."""
    rows, stdout = toy_default_run()
    assert len(rows) == 20
    for key in ("step", "reward/mean", "actor/loss", "actor/kl", "critic/loss", "actor/entropy",
                "response/length_mean", "timing/sync", "timing/generate", "timing/train", "perf/tokens_per_s"):
        assert key in rows[0], key
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last - first >= 0.3, rewards
    assert "Training completed in" in stdout and "step   20 |" in stdout and "reward" in stdout
    # Log-prob parity on the sampled tokens: vLLM's rollout log-probs vs the Megatron actor's
    # forward on the same tokens and weights, fp32. Measured ~1.4e-6 (reduction-order noise);
    # a bf16 slip (~1e-2) or temperature-processed log-probs (~1e-1) would fail this.
    assert max(r["rollout/logprob_diff_max"] for r in rows) < 1e-4


# TP=2, PP=2 and DP=2 runs against the single-process run: tests/test_resume.py
# (test_resume_at_another_layout continues a TP=1 checkpoint at each layout, same metrics).


# The GRPO run on the transformers engine also checks trainer.log_interval (3 steps, a console line
# every 2 and at the last): one run, not two, since the interval does not change what runs.
THINNED = ["trainer.max_steps=3", "trainer.log_interval=2"]


@pytest.fixture(scope="module")
def algo_run(tmp_path_factory):
    """`algo_run(algo, backend)` -> (metrics rows, stdout) of that preset's run on the toy data, run once."""
    cache = {}

    def get(algo, backend):
        if (algo, backend) not in cache:
            preset = os.path.join(os.path.dirname(__file__), "..", "configs", f"{algo}.yaml")
            steps = THINNED if (algo, backend) == ("grpo", "hf") else ["trainer.max_steps=2"]
            args = [preset, "data.dataset_name=toy", "data.max_prompt_length=8", "data.max_response_length=8",
                    f"actor_rollout_ref.rollout.name={backend}", *steps] + SMALL[:1] + [
                "actor_rollout_ref.actor.ppo_mini_batch_size=8",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "critic.ppo_micro_batch_size_per_gpu=8",
                "trainer.logger=[console]"]
            cache[algo, backend] = train(tmp_path_factory.mktemp(f"{algo}_{backend}"), args)
        return cache[algo, backend]

    return get


@pytest.mark.parametrize("algo,backend", [("grpo", "vllm"), ("grpo", "hf"), ("ppo", "hf")])
def test_algorithms_run_end_to_end(algo, backend, algo_run):
    rows, stdout = algo_run(algo, backend)
    assert [r["step"] for r in rows] == ([1, 2, 3] if (algo, backend) == ("grpo", "hf") else [1, 2])
    assert ("critic/loss" in rows[0]) == (algo == "ppo")
    if algo == "grpo":
        assert "actor/kl_loss" in rows[0]  # GRPO preset: KL to the reference as a loss
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)


def test_log_interval_thins_the_console_not_the_metrics(algo_run):
    """verl's quick-start line sets trainer.log_interval: a console line every N steps and the last."""
    rows, stdout = algo_run("grpo", "hf")  # log_interval=2, 3 steps
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "step    1 |" not in stdout and "step    2 |" in stdout and "step    3 |" in stdout, stdout[-2000:]


def _main(args):
    from mcore_rl.commands.train import main

    return main(args)


def test_bad_config_errors(capsys):
    assert _main(["data.train_batch_sise=8"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'data.train_batch_sise'" in err and "data.train_batch_size" in err
    assert _main(["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=5", "actor_rollout_ref.actor.use_dynamic_bsz=false"]) == 2
    err = capsys.readouterr().err
    assert "not divisible by DP=1 x actor.ppo_micro_batch_size_per_gpu=5" in err
    assert _main(["algorithm.adv_estimator=grpo"]) == 2
    assert "needs rollout.n >= 2" in capsys.readouterr().err
    assert _main(["no_such_section.x=1"]) == 2
    assert "valid sections: data, actor_rollout_ref" in capsys.readouterr().err


def test_tp_not_dividing_heads_fails_before_process_groups(tiny_model_factory, monkeypatch, capsys):
    import torch.distributed as dist

    path = tiny_model_factory("llama")  # 4 heads, 2 kv heads
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _main([f"actor_rollout_ref.model.path={path}", "data.dataset_name=toy",
                  "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=3",
                  "data.train_batch_size=48", "actor_rollout_ref.actor.ppo_mini_batch_size=48",
                  "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "critic.ppo_micro_batch_size_per_gpu=16"]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads=4 is not divisible by TP=3" in err
    assert not dist.is_initialized()
