"""Validation (data.val_files, trainer.test_freq, rollout.val_kwargs): pass@k against a brute-force
count, the toy validation split, and trainer runs whose val/ metrics are recomputed here: greedy
against plain transformers decoding of the initial and the final actor, sampled (2 engines)
against the samples the engines returned."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

from mcore_rl.trainer.validation import pass_at_k, pass_ks, prompt_sums, val_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pass_at_k_equals_counting_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(pass_at_k(n, c, k), want, rel_tol=1e-12), (n, c, k)
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]


def test_val_metrics_from_prompt_sums():
    rng = np.random.default_rng(0)
    n = 4
    scores = [list(rng.choice([0.0, 0.5, 1.0], size=n)) for _ in range(13)]
    # two engines' sums added (what the all-reduce does) equal one engine's over all prompts
    sums = [a + b for a, b in zip(prompt_sums(scores[:6], n), prompt_sums(scores[6:], n))]
    m = val_metrics(sums, n, response_tokens=13 * n * 5.0)
    s = np.array(scores)
    assert math.isclose(m["val/reward/mean@4"], s.mean())
    assert math.isclose(m["val/reward/best@4"], s.max(1).mean())
    assert math.isclose(m["val/reward/pass@1"], (s >= 1).mean())
    assert math.isclose(m["val/reward/pass@4"], (s >= 1).any(1).mean())
    c = (s >= 1).sum(1)
    assert math.isclose(m["val/reward/pass@2"], np.mean([1 - math.comb(n - ci, 2) / math.comb(n, 2) for ci in c]))
    assert m["val/response/length_mean"] == 5.0


def test_toy_validation_split():
    from mcore_rl.data import load_prompts

    val = load_prompts("toy", split="test")
    assert [r.prompt for r in val] == [f"{d}:" for d in "0123456789"]
    assert [r.ground_truth for r in val] == list("0123456789")
    train = load_prompts("toy", toy_size=50, seed=3)
    assert len(train) == 50 and [r.prompt for r in train] == [r.prompt for r in load_prompts("toy", toy_size=50, seed=3,
                                                                                                 split="train")]


def test_config_checks():
    from mcore_rl.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert cfg.data.val_files is None and cfg.trainer.test_freq == -1  # no validation by default
    with pytest.raises(ConfigError, match="trainer.test_freq=5 needs data.val_files"):
        load_config(None, ["trainer.test_freq=5"])
    with pytest.raises(ConfigError, match="val_kwargs.n=0: must be an integer >= 1"):
        load_config(None, ["actor_rollout_ref.rollout.val_kwargs.n=0"])


# ---------------------------------------------------------------- trainer runs
BASE = ["data.train_batch_size=8", "data.max_prompt_length=8", "data.max_response_length=8",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "critic.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.actor.use_kl_loss=false", "trainer.logger=[console]", "trainer.resume=off",
        "data.val_files=toy"]
FIRST_CHAR = '''
def reward(prompt, response, ground_truth):
    return 1.0 if response[:1] == str(ground_truth) else 0.25 * (response[1:2] == str(ground_truth))
'''


def _trainer(out, model, *extra):
    from mcore_rl.config import load_config
    from mcore_rl.trainer.ppo_trainer import PPOTrainer

    cfg = load_config(os.path.join(REPO, "configs", "toy_grpo.yaml"),
                      BASE + [f"actor_rollout_ref.model.path={model}", f"trainer.output_dir={out}", *extra])
    return PPOTrainer(cfg)


def _greedy_worker(out):
    from mcore_rl.toy import build_toy_model

    model = build_toy_model(os.path.join(out, "model"), seed=1)
    tr = _trainer(f"{out}/run", model, "trainer.max_steps=3", "trainer.test_freq=2", "trainer.export_hf_at_end=true")
    history = tr.fit()
    tr.close()
    return model, f"{out}/run/hf_model", history


def _greedy_reference(model_dir: str) -> tuple[float, float]:
    """(mean toy reward, mean response length) of plain greedy decoding of "0:" .. "9:" with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcore_rl.toy import toy_reward

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rewards, lengths = [], []
    for d in "0123456789":
        ids = tok(f"{d}:").input_ids
        new = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(lm(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        rewards.append(toy_reward(f"{d}:", tok.decode(new, skip_special_tokens=True), d))
        lengths.append(len(new))
    return float(np.mean(rewards)), float(np.mean(lengths))


@pytest.mark.train
def test_greedy_validation_equals_plain_decoding(tmp_path):
    """val_before_train, test_freq=2, 3 steps: val rows at steps 0, 2 and 3 (the last); at step 0
    the reward of greedy decoding of the initial model, at step 3 that of the exported actor."""
    from dist_utils import run_ranks

    model, final, history = run_ranks(_greedy_worker, 1, str(tmp_path))[0]
    val_steps = [h["step"] for h in history if "val/reward/mean@1" in h]
    assert val_steps == [0, 2, 3], val_steps
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    first, last = history[0], history[-1]
    for row, path in ((first, model), (last, final)):
        reward, length = _greedy_reference(path)
        assert math.isclose(row["val/reward/mean@1"], reward, abs_tol=1e-9), (row, reward)
        assert math.isclose(row["val/response/length_mean"], length, abs_tol=1e-9), (row, length)
        assert row["val/reward/best@1"] == row["val/reward/mean@1"]
    assert first["val/reward/mean@1"] != last["val/reward/mean@1"]  # the actor trained in between
    rows = [ln for ln in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 4  # step 0 has a row of its own; later validations share their step's row


def _sampled_worker(out, model, reward_file):
    import torch.distributed as dist

    tr = _trainer(f"{out}/run", model, "trainer.max_steps=1", "trainer.test_freq=1", "trainer.export_hf_at_end=false",
                  "actor_rollout_ref.rollout.val_kwargs.n=4", "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
                  "actor_rollout_ref.rollout.val_kwargs.temperature=1.0", f"reward.name={reward_file}:reward")
    seen = []
    original = tr.engine.generate

    def generate(prompts, sampling):
        outs = original(prompts, sampling)
        if sampling.n == 4:  # the validation call
            seen.append([(sampling.prompts[o.prompt_index], o.sample_index, o.token_ids) for o in outs])
        return outs

    tr.engine.generate = generate
    history = tr.fit()
    tr.close()
    assert dist.get_world_size() == 2
    return history, seen


@pytest.mark.train
def test_sampled_validation_over_two_engines(tmp_path):
    """Two ranks (two engines of rollout TP 1), 4 samples per validation prompt at temperature 1:
    each engine generates its half of the 10 prompts, and the metrics equal those recomputed
    from the samples both engines returned (mean@4, best@4, pass@1/2/4 by counting subsets)."""
    from dist_utils import run_ranks

    (tmp_path / "first_char.py").write_text(FIRST_CHAR)
    ns = {}
    exec(FIRST_CHAR, ns)
    from mcore_rl.toy import build_toy_model

    model = build_toy_model(tmp_path / "model", seed=1)
    results = run_ranks(_sampled_worker, 2, str(tmp_path), model, str(tmp_path / "first_char.py"))
    history = results[0][0]
    assert [h["step"] for h in history] == [0, 1]
    for r in range(2):  # both validations, each engine its own prompts
        assert len(results[r][1]) == 2
        for call in results[r][1]:
            assert sorted({p for p, _, _ in call}) == list(range(r, 10, 2))
    for v, row in enumerate(history):
        samples = {}
        for r in range(2):
            for p, k, ids in results[r][1][v]:
                samples.setdefault(p, []).append(ns["reward"](f"{p}:", _decode(ids), str(p)))
        assert sorted(samples) == list(range(10)) and all(len(x) == 4 for x in samples.values())
        s = np.array([samples[p] for p in range(10)])
        assert math.isclose(row["val/reward/mean@4"], s.mean(), abs_tol=1e-12)
        assert math.isclose(row["val/reward/best@4"], s.max(1).mean(), abs_tol=1e-12)
        for k in (1, 2, 4):
            want = np.mean([sum(any(c) for c in itertools.combinations(list(s[p] >= 1), k))
                            / math.comb(4, k) for p in range(10)])
            assert math.isclose(row[f"val/reward/pass@{k}"], want, abs_tol=1e-12), (v, k)
    assert 0 < history[0]["val/reward/pass@4"] < 1  # some prompts pass, not all: the counts matter


def _decode(ids):
    from mcore_rl.toy import TOY_VOCAB

    return "".join(TOY_VOCAB[i] for i in ids if TOY_VOCAB[i] not in ("<pad>", "<s>", "</s>", "<unk>"))


# ---------------------------------------------------------------- under the strict harness
@pytest.mark.train
def test_new_collectives_take_device_tensors_in_one_order(tmp_path):
    """DP=2 GRPO step under tests/strict_dist.py with validation (before training and after the
    step), the rollout correction (sequence-level masking, veto) and an LR warmup on: no host
    tensor in any collective, the same sequence of collectives on both ranks."""
    import json

    import strict_dist

    argv = [str(strict_dist.REPO / "configs" / "grpo.yaml"), "data.dataset_name=toy", "data.train_batch_size=4",
            "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=4",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.name=hf", "trainer.max_steps=1", "trainer.logger=[console]",
            "trainer.export_hf_at_end=false", "trainer.dist_timeout_s=60", "data.val_files=toy", "trainer.test_freq=1",
            "actor_rollout_ref.rollout.val_kwargs.n=2", "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
            "algorithm.rollout_is=true", "algorithm.rollout_is_level=sequence", "algorithm.rollout_is_mode=mask",
            "algorithm.rollout_is_veto_threshold=1e-4", "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.5",
            f"trainer.output_dir={tmp_path / 'run'}"]
    logs = tmp_path / "logs"
    p = strict_dist.launch("mcore_rl.commands.train:main", [argv], log_dir=logs, timeout_s=60, wall_s=420)
    try:
        problems = ""
        strict_dist.check_logs(logs, 2)
    except AssertionError as e:
        problems = str(e)
    assert p.returncode == 0 and not problems, f"{problems}\n--- exit code {p.returncode}:\n{strict_dist.excerpt(p.stdout)}"
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert "val/reward/pass@2" in rows[0] and "val/reward/pass@2" in rows[1] and "mismatch/k3_kl" in rows[1]
