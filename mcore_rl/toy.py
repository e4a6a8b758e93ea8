"""The built-in toy task: a new user's first run, built entirely locally (no hub download).

Task: the prompt is a digit followed by ':' (``"7:"``); the policy should answer by repeating the
prompt's digit (``"77777777"``). The reward is the fraction of the first ``TOY_RESPONSE_LEN``
response characters equal to that digit: dense (partial credit per character), dependent on the
prompt (any fixed answer scores at most 0.1, since each digit is the target of 1/10 of the
prompts), and low for the initial random policy (~1/15: one right token out of 15). The first
answer token must be read through attention from the prompt, so the policy really has to learn.

Why one digit: with several digits before ':' the policy must also learn *which* position to copy,
which a random 2-layer model does not pick up in ~20 RL steps (``benchmarks/toy_learnability.py``;
numbers in benchmarks/gpu/RESULTS.md).

The model is a tiny random Llama (head_dim 32: the smallest head size vLLM's CPU attention
accepts) with a character-level tokenizer, so the whole task trains in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import random

TOY_DIGITS = "0123456789"
TOY_PROMPT_DIGITS = 1  # digits before the ":"; the answer repeats the last one
TOY_RESPONSE_LEN = 8  # K: response characters scored (use it as the rollout's max_tokens)

# Training settings that lift the reward well above the initial policy's in 20 steps, GRPO and PPO
# with a critic alike, in seconds on one CPU thread (more threads than free cores is far slower on
# such tiny matrices); benchmarks/toy_learnability.py measures it (benchmarks/gpu/RESULTS.md).
TOY_TRAIN_DEFAULTS = dict(
    steps=20,
    prompts_per_step=16,  # GRPO: 16 prompts x 8 samples; PPO with a critic: 128 prompts x 1 sample
    samples_per_prompt=8,
    response_length=TOY_RESPONSE_LEN,
    temperature=1.0,
    actor_lr=1e-3,  # Adam, no weight decay, no warmup
    critic_lr=1e-3,
    ppo_epochs=1,
    ppo_mini_batches=4,  # 4 optimizer steps per rollout batch (mini-batch = 1/4 of the batch)
    clip_ratio=0.2,
    value_clip=0.5,
    grad_clip=1.0,
    gamma=1.0,
    lam=1.0,
    kl_coef=0.0,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
TOY_VOCAB = SPECIAL_TOKENS + list(TOY_DIGITS) + [":"]

# Tiny Llama. head_dim = hidden / heads = 32 (vLLM CPU attention's minimum).
TOY_MODEL_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    # Init std 0.1 rather than HF's 0.02: the prompt's signal reaches the logits strongly enough for
    # RL to pick it up in ~10 steps; the initial policy is still close to uniform (reward ~0.07).
    initializer_range=0.1,
)


def build_toy_tokenizer(out_dir: str | os.PathLike):
    """Write a character-level `PreTrainedTokenizerFast` to `out_dir` and return it.

    WordLevel over single characters (each character is a word after a split on every char) with a
    `Fuse` decoder, so decode(encode(s)) == s with no spaces inserted; a `<s>` is prepended to every
    encoding (as Llama tokenizers do) so vLLM and `AutoTokenizer` see the same ids.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TOY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=TOY_MODEL_CONFIG["max_position_embeddings"],
        padding_side="left",  # batched prompts end where generation starts
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes its own class name, which 4.x cannot resolve; this name loads in both.
    cfg_path = os.path.join(str(out_dir), "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    return fast


def build_toy_model(out_dir: str | os.PathLike, seed: int = 0, **config_overrides) -> str:
    """Write the tiny random Llama (fp32 safetensors) and its tokenizer to `out_dir`; return the path.

    Deterministic for a given seed, so two ranks (or a resumed run) building it get the same weights.
    """
    import torch
    import transformers as tf

    tokenizer = build_toy_tokenizer(out_dir)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TOY_MODEL_CONFIG, **config_overrides},
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(cfg).to(torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.max_new_tokens = TOY_RESPONSE_LEN
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)


def toy_prompts(n: int, seed: int = 0, num_digits: int = TOY_PROMPT_DIGITS, sep: str = ":") -> list[dict]:
    """`n` toy rows ``{"prompt": "7:", "ground_truth": "7"}``, deterministic in `seed`.

    `num_digits` > 1 makes the harder variant (``"3907:"`` -> repeat the last digit, ``"7"``).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = "".join(rng.choice(TOY_DIGITS) for _ in range(num_digits))
        rows.append({"prompt": digits + sep, "ground_truth": digits[-1]})
    return rows


def toy_val_prompts() -> list[dict]:
    """The toy task's validation split: each of its ten prompts ``"0:"`` .. ``"9:"`` once.

    The task has no unseen prompts to hold out; the split weighs every digit the same, so the
    validation reward reads the policy on the whole task without sampling noise in the prompts.
    """
    return [{"prompt": d + ":", "ground_truth": d} for d in TOY_DIGITS]


def toy_target(prompt: str) -> str:
    """The digit the answer must repeat: the last digit of the prompt (before the ':')."""
    for ch in reversed(prompt):
        if ch in TOY_DIGITS:
            return ch
    raise ValueError(f"toy prompt has no digit: {prompt!r}")


def toy_reward(prompt: str, response: str, ground_truth=None, k: int = TOY_RESPONSE_LEN) -> float:
    """Fraction of the first `k` response characters equal to the prompt's last digit (0..1).

    The target comes from `ground_truth` when given, else from the prompt itself; a short response
    counts its missing characters as wrong, so stopping early is never rewarded.
    """
    target = str(ground_truth).strip() if ground_truth not in (None, "") else toy_target(prompt)
    head = response.strip()[:k]
    return sum(ch == target for ch in head) / k


def write_toy_files(out_dir: str | os.PathLike, n: int = 256, seed: int = 0) -> str:
    """Write `n` toy rows as jsonl (verl layout) to `out_dir/toy.jsonl`; handy for trying the loaders."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(str(out_dir), "toy.jsonl")
    with open(path, "w") as f:
        for r in toy_prompts(n, seed):
            f.write(json.dumps({"prompt": r["prompt"], "reward_model": {"ground_truth": r["ground_truth"]}}) + "\n")
    return path
