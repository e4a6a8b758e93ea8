"""Configuration: `configs/defaults.yaml` is the schema, presets and `key=value` overrides go on top.

Validation happens here, before any process group, model or engine exists:
- malformed YAML, in a file or an override, fails with the place;
- an unknown key fails and names the closest valid keys;
- a value of the wrong type or out of range fails with what it must be (`rules.py`);
- sizes that cannot work fail with the numbers (`check_sizes`, given the world size).

The presets ship inside the package (`mcore_rl/configs`, the repository's `configs/`), so
`mcore-rl train`, `mcore-rl plan` and the Slurm scripts read the same defaults wherever the
package is installed.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mcore_rl.config.rules import BOOLEAN_WORDS, FALSE_WORDS, NOT_KEYS, NOT_YET, TRUE_WORDS, Rule, rules

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULTS = CONFIG_DIR / "defaults.yaml"
TOY = CONFIG_DIR / "toy.yaml"

__all__ = ["CONFIG_DIR", "DEFAULTS", "TOY", "ConfigError", "load_config", "read_config", "fit_batch_sizes",
           "check_sizes", "launch_world_size", "train_world_size", "to_plain"]


class ConfigError(ValueError):
    pass


def _flat_keys(cfg, prefix: str = "", leaves: bool = False) -> list[str]:
    """Dotted keys, sections included unless `leaves`; interpolations stay unresolved (they resolve
    only in the merged config)."""
    keys = []
    for k, v in cfg.items_ex(resolve=False):
        full = f"{prefix}{k}"
        if not (leaves and isinstance(v, DictConfig)):
            keys.append(full)
        if isinstance(v, DictConfig):
            keys += _flat_keys(v, full + ".", leaves)
    return keys


def _check_keys(schema: DictConfig, cfg: DictConfig, where: str) -> None:
    valid = set(_flat_keys(schema))
    for key in _flat_keys(cfg):
        if key not in valid:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            if parent and parent not in valid:
                continue  # reported at the parent
            if key in NOT_KEYS:
                raise ConfigError(f"unknown config key {key!r} (from {where}): {NOT_KEYS[key]}")
            raise ConfigError(f"unknown config key {key!r} (from {where}){_unknown_key_hint(schema, valid, key)}")


def _unknown_key_hint(schema: DictConfig, valid: set[str], key: str) -> str:
    """The closest names next to `key` (or the same name in another section), then every valid
    key of its section."""
    parent, _, name = key.rpartition(".")
    siblings = list(OmegaConf.select(schema, parent).keys()) if parent else list(schema.keys())
    close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(name, siblings, n=3, cutoff=0.6)]
    if not close:  # the right name in the wrong section: trainer.ppo_epochs
        close = [v for v in sorted(valid) if v.rsplit(".", 1)[-1] == name][:3]
    mean = f"; did you mean {' or '.join(close)}? valid" if close else "; valid"
    return f"{mean} {f'keys of {parent}' if parent else 'sections'}: {', '.join(siblings)}"


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _load_file(file: Path) -> DictConfig:
    if not file.is_file():
        raise ConfigError(f"config file {file} not found (presets: "
                          f"{', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.yaml')))})")
    try:
        layer = OmegaConf.load(file)
    except yaml.YAMLError as e:
        raise ConfigError(f"{file} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{file} must be a YAML mapping of config sections (data:, trainer:, ...)")
    return layer


def _load_overrides(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    for o in overrides:  # one at a time, to name the one that fails
        try:
            OmegaConf.from_dotlist([o])
        except yaml.YAMLError as e:
            key = o.split("=", 1)[0]
            raise ConfigError(f"override {o!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                              f"a string holding [ ] {{ }} or quotes needs YAML quotes: '{key}=\"...\"'") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {o!r}: {str(e).splitlines()[0]}") from None
    return OmegaConf.from_dotlist(list(overrides))


def _value_ok(value, want: type) -> bool:
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want)


def _check_one(key: str, value, default, rule: Rule) -> None:
    """One value against its rule (or its default's type); raises ConfigError saying what it must be."""
    if value is None:
        if default is None or rule.null:
            return
        raise ConfigError(f"{key} cannot be null (default {default!r})")
    if isinstance(value, str) and (key, value) in NOT_YET:
        raise ConfigError(f"{key}={value}: {NOT_YET[key, value]}")
    if rule.words:
        if value not in rule.words:
            raise ConfigError(f"{key}={value!r}: must be {rule.describe()}")
        return
    if isinstance(default, ListConfig) or rule.items or rule.length:
        items = list(value) if isinstance(value, ListConfig) else None
        if (items is None or (rule.length and len(items) != rule.length)
                or (rule.items and any(i not in rule.items for i in items))
                or (not rule.items and not all(_value_ok(i, float) and _in_range(i, rule) for i in items))):
            raise ConfigError(f"{key}={_show(value)}: must be {rule.describe()} (default {_show(default)})")
        return
    want = rule.type or (type(default) if default is not None else None)
    if want is None:
        return
    if not _value_ok(value, want) or not _in_range(value, rule):
        shown = Rule(type=want, lo=rule.lo, hi=rule.hi, open_lo=rule.open_lo, what=rule.what).describe()
        raise ConfigError(f"{key}={value!r}: must be {shown} (default {default!r})")


def _in_range(value, rule: Rule) -> bool:
    if rule.lo is not None and (value <= rule.lo if rule.open_lo else value < rule.lo):
        return False
    return rule.hi is None or value <= rule.hi


def _show(v) -> str:
    return str(OmegaConf.to_container(v)) if isinstance(v, (DictConfig, ListConfig)) else repr(v)


def _check_values(schema: DictConfig, cfg: DictConfig) -> None:
    """Every leaf against `rules()` or its default's type; YAML booleans turned back into words."""
    table = rules()
    for key in _flat_keys(schema):
        default = OmegaConf.select(schema, key)
        if isinstance(default, DictConfig):
            continue
        try:
            value = OmegaConf.select(cfg, key)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
        rule = table.get(key, Rule())
        words = rule.words or BOOLEAN_WORDS.get(key)
        if words and isinstance(value, bool):
            word = next((w for w in (TRUE_WORDS if value else FALSE_WORDS) if w in words), None)
            if word is not None:
                OmegaConf.update(cfg, key, word)
                value = word
        if rule.items and isinstance(value, str):  # verl's `trainer.logger=console`: a list of one
            OmegaConf.update(cfg, key, [value], merge=False)
            value = OmegaConf.select(cfg, key)
        _check_one(key, value, default, rule)


def _check_settings(cfg: DictConfig) -> None:
    """Values that are each well-typed but do not work (together)."""
    from mcore_rl.algorithms.rollout_correction import rollout_is_problems
    from mcore_rl.models.lora import config_problems as lora_problems
    from mcore_rl.models.optim import schedule_problems

    problems = rollout_is_problems(cfg.algorithm) + lora_problems(cfg.actor_rollout_ref.model)
    problems += schedule_problems(cfg.actor_rollout_ref.actor.optim, cfg.trainer.max_steps, "actor_rollout_ref.actor.optim")
    problems += schedule_problems(cfg.critic.optim, cfg.trainer.max_steps, "critic.optim")
    r = cfg.actor_rollout_ref.rollout
    if r.lora_sync == "adapter":
        if not cfg.actor_rollout_ref.model.lora_rank:
            problems.append("actor_rollout_ref.rollout.lora_sync=adapter needs a LoRA actor (actor_rollout_ref.model.lora_rank > 0)")
        if r.name == "hf":
            problems.append("actor_rollout_ref.rollout.lora_sync=adapter needs the vLLM engine (rollout.name=vllm or auto)")
        if r.placement == "split":
            problems.append("actor_rollout_ref.rollout.lora_sync=adapter works with colocated placement only "
                            "(split placement sends merged weights: use lora_sync=merged)")
    if cfg.algorithm.rollout_is and not r.calculate_log_probs:
        problems.append("algorithm.rollout_is=true weighs by the rollout engine's log-probs: it needs "
                        "actor_rollout_ref.rollout.calculate_log_probs=true")
    if cfg.trainer.test_freq > 0 and cfg.data.val_files is None:
        problems.append(f"trainer.test_freq={cfg.trainer.test_freq} needs data.val_files (toy: the toy task's split)")
    if problems:
        raise ConfigError("; ".join(problems))


def _shipped(file: Path) -> bool:
    """A preset of the package (its values are defaults that may adapt), not the user's own file."""
    return file.resolve().parent == CONFIG_DIR.resolve()


def read_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> tuple[DictConfig, set[str]]:
    """defaults.yaml <- preset/user YAML (`path`, default the toy preset) <- overrides, checked key by key.

    Returns the config and the keys the user wrote (their own YAML file and the overrides):
    those are never adapted by `fit_batch_sizes`.
    """
    schema = _load_file(DEFAULTS)
    cfg, explicit = schema, set()
    file = TOY if path is None else Path(path)
    layers = [(str(file), _load_file(file), not _shipped(file))]
    if overrides:
        layers.append(("command line", _load_overrides(list(overrides)), True))
    for where, layer, users in layers:
        _check_keys(schema, layer, where)
        cfg = OmegaConf.merge(cfg, layer)
        if users:
            explicit |= set(_flat_keys(layer, leaves=True))
    _check_values(schema, cfg)
    _check_settings(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg, explicit


def uses_critic(cfg: DictConfig) -> bool:
    """The algorithm trains a critic (GAE advantages)."""
    return cfg.algorithm.adv_estimator == "gae"


def needs_reference(cfg: DictConfig) -> bool:
    """The algorithm needs the frozen reference policy (KL loss, or KL in the reward)."""
    return bool(cfg.actor_rollout_ref.actor.use_kl_loss or cfg.algorithm.use_kl_in_reward)


def train_world_size(cfg: DictConfig, world_size: int) -> int:
    """Ranks that train: all of them, or with split placement those that do not only generate."""
    r = cfg.actor_rollout_ref.rollout
    return world_size - r.n_gpus if r.placement == "split" else world_size


def launch_world_size() -> int:
    """Ranks of this job as the launcher says (torchrun's WORLD_SIZE, else Slurm's task count, else 1)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> DictConfig:
    """The checked config, with default batch sizes fitted to the user's batch and `world_size` ranks
    (default: this job's, from the launcher's environment)."""
    cfg, explicit = read_config(path, overrides)
    fit_batch_sizes(cfg, explicit, launch_world_size() if world_size is None else world_size)
    return cfg


def _largest_divisor(n: int, at_most: int, multiple_of: int = 1) -> int | None:
    return next((d for d in range(min(at_most, n), 0, -1) if n % d == 0 and d % multiple_of == 0), None)


def fit_batch_sizes(cfg: DictConfig, explicit: set[str], world_size: int) -> None:
    """Mini- and micro-batch sizes that come from the defaults or a shipped preset and do not divide
    the batch (`data.train_batch_size=4` against a preset's mini-batch of 32) become the largest size
    that does, with a one-line note; a size the user wrote is left for `check_sizes` to refuse.

    As in verl, `ppo_mini_batch_size` counts prompts and must divide `data.train_batch_size`; a
    smaller mini-batch means more optimizer steps per batch, hence the note. The micro-batch only
    bounds memory (the loss does not depend on it).
    """
    a = cfg.actor_rollout_ref
    model_parallel = a.actor.megatron.tensor_model_parallel_size * a.actor.megatron.pipeline_model_parallel_size
    world_size = train_world_size(cfg, world_size)
    if world_size < 1 or world_size % model_parallel:
        return  # check_sizes names the problem
    dp, batch = world_size // model_parallel, cfg.data.train_batch_size
    changed = []
    key = "actor_rollout_ref.actor.ppo_mini_batch_size"
    mini = a.actor.ppo_mini_batch_size
    if key not in explicit and (batch % mini or mini % dp):
        new = _largest_divisor(batch, mini, dp)
        if new:
            a.actor.ppo_mini_batch_size = new
            changed.append(f"{key}={new} (was {mini})")
    per_rank = a.actor.ppo_mini_batch_size * a.rollout.n // dp
    if a.actor.ppo_mini_batch_size % dp == 0:
        for key in ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "critic.ppo_micro_batch_size_per_gpu"):
            micro = OmegaConf.select(cfg, key)
            if key not in explicit and per_rank % micro:
                new = _largest_divisor(per_rank, micro)
                OmegaConf.update(cfg, key, new)
                changed.append(f"{key}={new} (was {micro})")
    if changed and _rank() == 0:
        print(f"mcore_rl: note: fitted to data.train_batch_size={batch} on {dp} data-parallel rank(s): "
              f"{', '.join(changed)}; set them to choose", file=sys.stderr, flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def check_sizes(cfg: DictConfig, world_size: int, spec=None) -> None:
    """Fail early, with the numbers, on sizes that cannot work; given the model (`spec`), on LoRA
    target modules it does not have."""
    a = cfg.actor_rollout_ref
    tp, pp = a.actor.megatron.tensor_model_parallel_size, a.actor.megatron.pipeline_model_parallel_size
    rtp = a.rollout.tensor_model_parallel_size
    problems = []
    job = world_size
    if a.rollout.placement == "split":
        world_size, rollout_world = job - a.rollout.n_gpus, a.rollout.n_gpus
        if not 0 < rollout_world < job:
            problems.append(f"placement=split: rollout.n_gpus={rollout_world} must leave both sides at least one of "
                            f"the {job} ranks started")
        elif rollout_world % rtp:
            problems.append(f"rollout.n_gpus={rollout_world} is not divisible by rollout TP={rtp}")
    else:
        if a.rollout.n_gpus:
            problems.append(f"rollout.n_gpus={a.rollout.n_gpus} needs rollout.placement=split")
        if cfg.async_training.staleness:
            problems.append(f"async_training.staleness={cfg.async_training.staleness} needs rollout.placement=split "
                            f"(colocated ranks generate and train in turn)")
        if world_size % rtp:
            problems.append(f"world size {world_size} is not divisible by rollout TP={rtp}")
    if world_size > 0 and world_size % (tp * pp):
        problems.append(f"{'training ranks' if job != world_size else 'world size'} {world_size} is not divisible "
                        f"by TP={tp} x PP={pp}")
    dp = max(world_size // (tp * pp), 1)
    n = a.rollout.n
    if a.actor.ppo_mini_batch_size > cfg.data.train_batch_size or cfg.data.train_batch_size % a.actor.ppo_mini_batch_size:
        problems.append(f"data.train_batch_size={cfg.data.train_batch_size} is not a multiple of "
                        f"actor.ppo_mini_batch_size={a.actor.ppo_mini_batch_size} (prompts per optimizer step)")
    if a.actor.ppo_mini_batch_size % dp:
        problems.append(f"actor.ppo_mini_batch_size={a.actor.ppo_mini_batch_size} is not divisible by DP={dp}: "
                        f"every mini-batch is split by whole prompts (with their rollout.n samples) over DP ranks")
    mini = a.actor.ppo_mini_batch_size * n
    micros = () if a.actor.use_dynamic_bsz else (  # packed: token budgets size the micro-batches, not rows
        ("actor.ppo_micro_batch_size_per_gpu", a.actor.ppo_micro_batch_size_per_gpu),
        ("critic.ppo_micro_batch_size_per_gpu", cfg.critic.ppo_micro_batch_size_per_gpu))
    for name, micro in micros:
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
    if (t.nnodes is None) != (t.n_gpus_per_node is None):
        problems.append("trainer.nnodes and trainer.n_gpus_per_node go together (or leave both null)")
    elif t.nnodes is not None and t.nnodes * t.n_gpus_per_node != job:
        problems.append(f"trainer.nnodes={t.nnodes} x trainer.n_gpus_per_node={t.n_gpus_per_node} != "
                        f"{job} ranks started (torchrun --nnodes/--nproc_per_node, or Slurm tasks)")
    if spec is not None:
        try:
            spec.check_parallel(tp, pp)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("impossible sizes: " + "; ".join(problems))
    if spec is not None and a.model.lora_rank:
        from mcore_rl.models.lora import resolve_targets

        try:
            resolve_targets(a.model.target_modules, spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def to_plain(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
