"""What a run reads, checked and loaded before any process group, model or engine exists.

Building the models and starting vLLM takes seconds to minutes; a dataset that does not parse,
a reward function that does not import, a rollout engine or logger that is not installed must
fail before that, in seconds, with a line that names it (and, under torchrun, on every rank
alike, before any collective could hang on a rank that failed alone).
"""

from __future__ import annotations

import importlib.util
import os

from omegaconf import DictConfig

from converters.checkpoint import overlaps
from mcore_rl.data import PromptLoader, load_prompts
from mcore_rl.rewards import RewardScorer
from mcore_rl.rollout import vllm_available

# trainer.logger names -> the package each needs
LOGGERS = {"console": None, "tensorboard": "tensorboard", "wandb": "wandb"}


def check_environment(cfg: DictConfig, model_path: str, output_dir: str) -> None:
    """Rollout engine and loggers installed; the model not inside what the run replaces."""
    if overlaps(model_path, os.path.join(output_dir, "hf_model")):
        raise ValueError(f"actor_rollout_ref.model.path={model_path} overlaps this run's {output_dir}/hf_model, "
                         f"which the run replaces: copy the model elsewhere or choose another trainer.output_dir")
    if cfg.actor_rollout_ref.rollout.name == "vllm" and not vllm_available():
        raise ValueError("actor_rollout_ref.rollout.name=vllm but vLLM is not installed: install it "
                         "(the cpu or gpu extra), or use rollout.name=hf")
    for name in cfg.trainer.logger:  # (names are checked with the config)
        if LOGGERS[name] and importlib.util.find_spec(LOGGERS[name]) is None:
            raise ValueError(f"trainer.logger has {name} but the {LOGGERS[name]} package is not installed: "
                             f"pip install {LOGGERS[name]}, or drop it from trainer.logger")


def load_inputs(cfg: DictConfig, model_path: str, output_dir: str):
    """(tokenizer, pad id, prompt dataset, prompt loader, reward scorer) of a run, after
    `check_environment`. The reward scorer's helper process starts now, while the models build."""
    from transformers import AutoTokenizer  # seconds to import: only when a run starts

    check_environment(cfg, model_path, output_dir)
    d = cfg.data
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    template = {"auto": None, True: True, False: False, "true": True, "false": False}[d.apply_chat_template]
    dataset = load_prompts(d.dataset_name, prompt_key=d.prompt_key, answer_key=d.answer_key, tokenizer=tokenizer,
                           max_prompt_length=d.max_prompt_length, apply_chat_template=template,
                           on_bad_row=d.on_bad_row, toy_size=d.toy_size, seed=d.seed)
    # every rank reads the step's prompts (small); the layout says which it generates and trains on
    loader = PromptLoader(dataset, train_batch_size=d.train_batch_size, seed=d.seed, shuffle=d.shuffle)
    rewards = RewardScorer(cfg.reward.name, timeout_s=cfg.reward.timeout_s)
    return tokenizer, pad_id, dataset, loader, rewards
