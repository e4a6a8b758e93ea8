"""Config values: YAML's booleans, word choices and types, checked at load (before any process group)."""

import pytest
from omegaconf import DictConfig, OmegaConf

from mcore_rl.config import DEFAULTS, ConfigError, _choices, check_sizes, load_config


def _leaves(cfg: DictConfig, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, DictConfig):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


SCHEMA = OmegaConf.load(DEFAULTS)
BOOL_KEYS = [k for k, v in _leaves(SCHEMA) if isinstance(v, bool)]
WORD_KEYS = {k: w for k, w in _choices().items() if {"off", "false", "no", "true", "on", "yes"} & set(w)}
WORD_KEYS["trainer.resume"] = ("auto", "off")


def test_every_yes_no_key_is_covered():
    # the schema has yes/no keys and keys where off/false is a word of their own
    assert len(BOOL_KEYS) >= 5
    assert "actor_rollout_ref.rollout.sync_fast_path" in WORD_KEYS and "data.apply_chat_template" in WORD_KEYS


@pytest.mark.parametrize("key", BOOL_KEYS)
@pytest.mark.parametrize("word,value", [("yes", True), ("no", False), ("on", True), ("off", False),
                                        ("true", True), ("false", False), ("True", True), ("False", False)])
def test_yaml_boolean_words_in_yes_no_keys(key, word, value):
    assert OmegaConf.select(load_config(None, [f"{key}={word}"]), key) is value


@pytest.mark.parametrize("key", sorted(WORD_KEYS))
def test_off_false_no_are_words_where_the_key_takes_words(key):
    """`sync_fast_path=off` reaches YAML as the boolean False; the key gets its own word back."""
    words = WORD_KEYS[key]
    false_word = next(w for w in ("off", "false", "no") if w in words)
    for typed in ("off", "false", "no", "False"):
        assert OmegaConf.select(load_config(None, [f"{key}={typed}"]), key) == false_word
    true_word = next((w for w in ("on", "true", "yes") if w in words), None)
    if true_word:
        assert OmegaConf.select(load_config(None, [f"{key}=yes"]), key) == true_word


def test_word_reaches_the_consumer():
    from mcore_rl.resharding import FAST_PATH_MODES

    cfg = load_config(None, ["actor_rollout_ref.rollout.sync_fast_path=off"])
    assert cfg.actor_rollout_ref.rollout.sync_fast_path in FAST_PATH_MODES


@pytest.mark.parametrize("override,msg", [
    ("actor_rollout_ref.model.dtype=bf16", "must be one of float32, bfloat16"),
    ("algorithm.adv_estimator=ppo", "must be one of gae, grpo"),
    ("actor_rollout_ref.rollout.sync_fast_path=on", "must be one of auto, off"),
    ("trainer.max_steps=2.5", "must be an integer"),
    ("actor_rollout_ref.actor.optim.lr=abc", "must be a number"),
    ("actor_rollout_ref.rollout.free_cache_engine=maybe", "must be true or false"),
    ("data.train_batch_size=null", "cannot be null"),
    ("trainer.device=gpu", "must be one of auto, cpu, cuda"),
    ("actor_rollout_ref.rollout.name=sglang", "SGLang is not supported; the rollout engine is vLLM"),
    ("trainer.log_interval=0.5", "must be an integer"),
])
def test_bad_values_fail_at_load(override, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        load_config(None, [override])


def test_good_values_pass():
    cfg = load_config(None, ["actor_rollout_ref.actor.optim.lr=3", "trainer.max_ckpt_to_keep=null",
                             "actor_rollout_ref.actor.clip_ratio_c=3.0"])
    assert cfg.actor_rollout_ref.actor.optim.lr == 3 and cfg.trainer.max_ckpt_to_keep is None


def test_every_preset_loads():
    for preset in sorted(DEFAULTS.parent.glob("*.yaml")):
        load_config(preset, [])


def test_nnodes_and_gpus_per_node_must_match_the_world():
    ok = load_config(None, ["trainer.nnodes=2", "trainer.n_gpus_per_node=4",
                            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                            "critic.ppo_micro_batch_size_per_gpu=2"])
    check_sizes(ok, 8)
    with pytest.raises(ConfigError, match=r"nnodes=2 x trainer.n_gpus_per_node=4 != 2 ranks"):
        check_sizes(ok, 2)
    with pytest.raises(ConfigError, match="go together"):
        check_sizes(load_config(None, ["trainer.nnodes=2"]), 2)
