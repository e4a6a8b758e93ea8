"""Configuration: `configs/defaults.yaml` is the schema, presets and `key=value` overrides go on top.

Validation happens here, before any process group, model or engine exists:
- an unknown key fails and names the closest valid keys;
- sizes that cannot work fail with the numbers (`check_sizes`, given the world size).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"
TOY = CONFIG_DIR / "toy.yaml"


class ConfigError(ValueError):
    pass


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _flat_keys(v, full + ".")
    return keys


def _check_keys(schema: DictConfig, cfg: DictConfig, where: str) -> None:
    valid = set(_flat_keys(schema))
    for key in _flat_keys(cfg):
        if key not in valid:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            if parent and parent not in valid:
                continue  # reported at the parent
            close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            if not close and not parent:
                hint = f"; valid sections: {', '.join(schema.keys())}"
            raise ConfigError(f"unknown config key {key!r} (from {where}){hint}")


def _choices() -> dict[str, tuple]:
    """Keys that take one of a few words (the estimators and modes come from their own modules)."""
    from mcore_rl.algorithms.advantages import ADV_ESTIMATORS
    from mcore_rl.algorithms.losses import AGG_MODES, KL_KINDS

    return {
        "data.apply_chat_template": ("auto", "true", "false"),
        "data.on_bad_row": ("skip", "error"),
        "actor_rollout_ref.model.dtype": ("float32", "bfloat16", "float16"),
        "actor_rollout_ref.model.transformer_impl": ("local", "transformer_engine"),
        "actor_rollout_ref.actor.loss_agg_mode": AGG_MODES,
        "actor_rollout_ref.actor.policy_loss": ("vanilla", "gspo", "cispo"),
        "actor_rollout_ref.actor.kl_loss_type": tuple(KL_KINDS),
        "actor_rollout_ref.rollout.name": ("auto", "vllm", "hf"),
        "actor_rollout_ref.rollout.sync_fast_path": ("auto", "off"),
        "critic.loss_agg_mode": AGG_MODES,
        "algorithm.adv_estimator": tuple(ADV_ESTIMATORS),
        "algorithm.kl_penalty": tuple(KL_KINDS),
        "trainer.device": ("auto", "cpu", "cuda"),
    }


# Words that YAML reads as booleans (`key=off` arrives as False) and the keys where such a word
# is a value of its own rather than a yes/no: the boolean is turned back into the key's word.
_FALSE_WORDS, _TRUE_WORDS = ("off", "false", "no"), ("on", "true", "yes")
_WORDS = {"trainer.resume": ("auto", "off")}  # auto | off | PATH
_NULLABLE = {"trainer.max_ckpt_to_keep"}
_NOT_YET = {("actor_rollout_ref.rollout.name", "sglang"):
            "SGLang is not supported; the rollout engine is vLLM (actor_rollout_ref.rollout.name=vllm, or auto)"}  # null has a meaning (keep all) though the default is not null


def _check_values(schema: DictConfig, cfg: DictConfig) -> None:
    """Types from the defaults, words from `_choices`; YAML booleans mapped back to words."""
    choices = _choices()
    for key in _flat_keys(schema):
        default, value = OmegaConf.select(schema, key), OmegaConf.select(cfg, key)
        if isinstance(default, (DictConfig, ListConfig)):
            continue
        words = choices.get(key) or _WORDS.get(key)
        if words and isinstance(value, bool):
            word = next((w for w in (_TRUE_WORDS if value else _FALSE_WORDS) if w in words), None)
            if word is not None:
                OmegaConf.update(cfg, key, word)
                value = word
        if value is None:
            if default is None or key in _NULLABLE:
                continue
            raise ConfigError(f"{key} cannot be null (default {default!r})")
        if key in choices:
            if (key, value) in _NOT_YET:
                raise ConfigError(f"{key}={value}: {_NOT_YET[key, value]}")
            if value not in choices[key]:
                raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(str, choices[key]))}")
            continue
        if default is None:
            continue
        want = type(default)
        ok = (isinstance(value, bool) if want is bool else
              isinstance(value, int) and not isinstance(value, bool) if want is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
              isinstance(value, want))
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(want, want.__name__)
            raise ConfigError(f"{key}={value!r}: must be {kind} (default {default!r})")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """defaults.yaml <- preset/user YAML (`path`, default the toy config) <- overrides."""
    schema = OmegaConf.load(DEFAULTS)
    cfg = schema
    layers = [(TOY if path is None else Path(path), None)]
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        layers.append((None, OmegaConf.from_dotlist(list(overrides))))
    for file, layer in layers:
        if file is not None:
            if not file.exists():
                raise ConfigError(f"config file {file} not found (presets: {', '.join(p.name for p in CONFIG_DIR.glob('*.yaml'))})")
            layer = OmegaConf.load(file)
        _check_keys(schema, layer, str(file) if file else "command line")
        cfg = OmegaConf.merge(cfg, layer)
    _check_values(schema, cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg


def check_sizes(cfg: DictConfig, world_size: int, spec=None) -> None:
    """Fail early, with the numbers, on sizes that cannot work."""
    a = cfg.actor_rollout_ref
    tp, pp = a.actor.megatron.tensor_model_parallel_size, a.actor.megatron.pipeline_model_parallel_size
    rtp = a.rollout.tensor_model_parallel_size
    problems = []
    if world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by TP={tp} x PP={pp}")
    if world_size % rtp:
        problems.append(f"world size {world_size} is not divisible by rollout TP={rtp}")
    dp = max(world_size // (tp * pp), 1)
    n = a.rollout.n
    if a.actor.ppo_mini_batch_size > cfg.data.train_batch_size or cfg.data.train_batch_size % a.actor.ppo_mini_batch_size:
        problems.append(f"data.train_batch_size={cfg.data.train_batch_size} is not a multiple of "
                        f"actor.ppo_mini_batch_size={a.actor.ppo_mini_batch_size}")
    if a.actor.ppo_mini_batch_size % dp:
        problems.append(f"actor.ppo_mini_batch_size={a.actor.ppo_mini_batch_size} is not divisible by DP={dp}: "
                        f"every mini-batch is split by whole prompts (with their rollout.n samples) over DP ranks")
    mini = a.actor.ppo_mini_batch_size * n
    for name, micro in (("actor.ppo_micro_batch_size_per_gpu", a.actor.ppo_micro_batch_size_per_gpu),
                        ("critic.ppo_micro_batch_size_per_gpu", cfg.critic.ppo_micro_batch_size_per_gpu)):
        if mini % (dp * micro):
            problems.append(f"mini-batch of {mini} sequences (ppo_mini_batch_size={a.actor.ppo_mini_batch_size} x "
                            f"rollout.n={n}) is not divisible by DP={dp} x {name}={micro}")
    if a.actor.use_dynamic_bsz:
        longest = cfg.data.max_prompt_length + cfg.data.max_response_length
        for name, budget in (("actor.ppo_max_token_len_per_gpu", a.actor.ppo_max_token_len_per_gpu),
                             ("rollout.log_prob_max_token_len_per_gpu", a.rollout.log_prob_max_token_len_per_gpu),
                             ("ref.log_prob_max_token_len_per_gpu", a.ref.log_prob_max_token_len_per_gpu),
                             ("critic.ppo_max_token_len_per_gpu", cfg.critic.ppo_max_token_len_per_gpu)):
            if budget < longest:
                problems.append(f"{name}={budget} is below the longest sequence, max_prompt_length + "
                                f"max_response_length = {longest} (actor.use_dynamic_bsz packs whole sequences)")
    if cfg.algorithm.adv_estimator in ("grpo", "rloo", "reinforce_plus_plus_baseline") and n < 2:
        problems.append(f"algorithm.adv_estimator={cfg.algorithm.adv_estimator} needs rollout.n >= 2 (got {n})")
    t = cfg.trainer
    if t.log_interval < 1:
        problems.append(f"trainer.log_interval={t.log_interval} must be >= 1")
    if (t.nnodes is None) != (t.n_gpus_per_node is None):
        problems.append("trainer.nnodes and trainer.n_gpus_per_node go together (or leave both null)")
    elif t.nnodes is not None and t.nnodes * t.n_gpus_per_node != world_size:
        problems.append(f"trainer.nnodes={t.nnodes} x trainer.n_gpus_per_node={t.n_gpus_per_node} != "
                        f"{world_size} ranks started (torchrun --nnodes/--nproc_per_node, or Slurm tasks)")
    if spec is not None:
        try:
            spec.check_parallel(tp, pp)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("impossible sizes: " + "; ".join(problems))


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
