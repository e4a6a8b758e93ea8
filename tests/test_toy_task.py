"""The toy task: local tokenizer and model, prompts, reward, and that RL really learns it quickly."""

import importlib.util
import json
import os
import random
import statistics

import pytest
import torch

from mcore_rl.toy import (
    TOY_DIGITS,
    TOY_RESPONSE_LEN,
    TOY_VOCAB,
    build_toy_model,
    build_toy_tokenizer,
    toy_prompts,
    toy_reward,
)

pytestmark = pytest.mark.train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("toy_model"), seed=0)


def test_tokenizer_roundtrip_via_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    build_toy_tokenizer(tmp_path)
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"  # loads in transformers 4 and 5
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == len(TOY_VOCAB) == 15
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("3907:").input_ids
    assert ids == [1, 7, 13, 4, 11, 14]  # <s> 3 9 0 7 :
    assert tok.decode(ids, skip_special_tokens=True) == "3907:"  # no spaces between characters
    assert tok.decode([11, 11, 2], skip_special_tokens=True) == "77"
    assert tok("x").input_ids == [1, tok.unk_token_id]


def test_model_checkpoint(toy_dir):
    import safetensors.torch
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(toy_dir)
    assert cfg.model_type == "llama"
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention
    assert cfg.vocab_size == len(tf.AutoTokenizer.from_pretrained(toy_dir))
    assert cfg.max_position_embeddings <= 128
    weights = safetensors.torch.load_file(os.path.join(toy_dir, "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    model = tf.AutoModelForCausalLM.from_pretrained(toy_dir)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 11, 14]])).logits
    assert logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(logits).all()


def test_model_deterministic_in_seed(tmp_path, toy_dir):
    import safetensors.torch

    load = lambda d: safetensors.torch.load_file(os.path.join(d, "model.safetensors"))  # noqa: E731
    a, same = load(toy_dir), load(build_toy_model(tmp_path / "a", seed=0))
    other = load(build_toy_model(tmp_path / "b", seed=1))
    name = "model.embed_tokens.weight"
    assert torch.equal(a[name], same[name]) and not torch.equal(a[name], other[name])


def test_prompts_deterministic_with_ground_truth():
    rows = toy_prompts(200, seed=0)
    assert rows == toy_prompts(200, seed=0) and rows != toy_prompts(200, seed=1)
    for r in rows:
        assert r["prompt"][-1] == ":" and r["ground_truth"] == r["prompt"][-2]
    assert {r["ground_truth"] for r in rows} == set(TOY_DIGITS)  # every digit is a target
    longer = toy_prompts(5, seed=0, num_digits=4)
    assert all(len(r["prompt"]) == 5 and r["ground_truth"] == r["prompt"][3] for r in longer)


def test_reward_hand_checked():
    assert toy_reward("7:", "77777777") == 1.0
    assert toy_reward("7:", "7777777777") == 1.0  # only the first K count
    assert toy_reward("7:", "77770000") == 0.5
    assert toy_reward("7:", "") == 0.0
    assert toy_reward("3907:", "7") == 1 / TOY_RESPONSE_LEN  # target from the prompt's last digit
    assert toy_reward("1:", "11111111", ground_truth="2") == 0.0  # ground truth wins when given
    with pytest.raises(ValueError, match="no digit"):
        toy_reward("abc", "111")


def test_random_and_constant_policies_score_low():
    rng = random.Random(0)
    rows = toy_prompts(2000, seed=0)
    chars = TOY_DIGITS + ":"
    rand = statistics.mean(
        toy_reward(r["prompt"], "".join(rng.choice(chars) for _ in range(TOY_RESPONSE_LEN))) for r in rows)
    assert rand <= 0.12  # uniform over the 11 printable tokens: 1/11
    for d in TOY_DIGITS:  # a fixed answer cannot exploit the reward
        assert statistics.mean(toy_reward(r["prompt"], d * TOY_RESPONSE_LEN) for r in rows) <= 0.13


def test_rl_learns_the_toy_task_quickly():
    """The plain-PyTorch GRPO loop of benchmarks/toy_learnability.py with the toy defaults."""
    spec = importlib.util.spec_from_file_location("toy_learnability", os.path.join(ROOT, "benchmarks",
                                                                                   "toy_learnability.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.run(bench.parse_args(["--seed", "0", "--steps", "15", "--threads", "1"]))
    print(json.dumps(out["rewards"]))
    assert out["first3"] <= 0.15  # the random initial policy is bad at it
    assert out["gain"] >= 0.3, out["rewards"]
