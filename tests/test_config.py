"""Config values: YAML's booleans, word choices, types and ranges, checked at load (before any
process group); default batch sizes fitted to the user's batch; the presets shipped in the wheel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from mcore_rl.config import DEFAULTS, ConfigError, check_sizes, load_config, read_config
from mcore_rl.config.rules import rules

REPO = Path(__file__).resolve().parents[1]


def _leaves(cfg: DictConfig, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, DictConfig):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


SCHEMA = OmegaConf.load(DEFAULTS)
BOOL_KEYS = [k for k, v in _leaves(SCHEMA) if isinstance(v, bool)]
WORD_KEYS = {k: r.words for k, r in rules().items() if {"off", "false", "no", "true", "on", "yes"} & set(r.words)}
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


# --- values: one clear line each, before anything is allocated ---------------------------------

@pytest.mark.parametrize("override,msg", [
    ("actor_rollout_ref.actor.optim.lr=abc", "optim.lr='abc': must be a number >= 0"),
    ("actor_rollout_ref.actor.optim.lr=-1e-6", "optim.lr=-1e-06: must be a number >= 0"),
    ("data.train_batch_size=0", "data.train_batch_size=0: must be an integer >= 1"),
    ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0", "ppo_micro_batch_size_per_gpu=0: must be an integer >= 1"),
    ("critic.ppo_micro_batch_size_per_gpu=-2", "critic.ppo_micro_batch_size_per_gpu=-2: must be an integer >= 1"),
    ("actor_rollout_ref.rollout.n=0", "rollout.n=0: must be an integer >= 1"),
    ("data.max_response_length=0", "max_response_length=0: must be an integer >= 1"),
    ("algorithm.adv_estimator=ppo", "adv_estimator='ppo': must be one of gae, grpo"),
    ("trainer.device=gpu", "trainer.device='gpu': must be one of auto, cpu, cuda"),
    ("trainer.max_steps=2.5", "trainer.max_steps=2.5: must be an integer >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1"),
    ("actor_rollout_ref.rollout.top_p=0", "top_p=0: must be a number in (0, 1]"),
    ("actor_rollout_ref.rollout.gpu_memory_utilization=1.5", "gpu_memory_utilization=1.5: must be a number in (0, 1]"),
    ("actor_rollout_ref.rollout.temperature=-0.5", "temperature=-0.5: must be a number >= 0"),
    ("algorithm.gamma=1.1", "algorithm.gamma=1.1: must be a number in [0, 1]"),
    ("actor_rollout_ref.actor.clip_ratio_c=0.5", "clip_ratio_c=0.5: must be a number > 1"),
    ("actor_rollout_ref.actor.optim.betas=[0.9]", "betas=[0.9]: must be a list of 2 numbers in [0, 1]"),
    ("actor_rollout_ref.actor.optim.betas=[0.9,abc]", "must be a list of 2 numbers"),
    ("trainer.logger=[console,tensorbord]",
     "trainer.logger=['console', 'tensorbord']: must be a list of console, tensorboard, wandb"),
    ("trainer.nnodes=0", "trainer.nnodes=0: must be an integer >= 1"),
    ("actor_rollout_ref.model.path=3", "model.path=3: must be a string"),
    ("trainer.max_ckpt_to_keep=0", "max_ckpt_to_keep=0: must be an integer >= 1"),
    ("actor_rollout_ref.rollout.kv_cache_gib=0", "kv_cache_gib=0: must be a number > 0"),
    ("critic.optim.lr=${nope}", "critic.optim.lr: Interpolation key 'nope' not found"),
    ("data.max_prompt_length=[8", "override 'data.max_prompt_length=[8': the value is not valid YAML"),
    ("trainer.experiment_name={a", "the value is not valid YAML"),
])
def test_bad_values_name_the_key_and_what_it_must_be(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_rollout_is_needs_the_engines_log_probs():
    with pytest.raises(ConfigError, match="rollout_is=true .* needs actor_rollout_ref.rollout.calculate_log_probs=true"):
        load_config(None, ["algorithm.rollout_is=true", "actor_rollout_ref.rollout.calculate_log_probs=false"])
    load_config(None, ["algorithm.rollout_is=true"])


def test_values_in_range_pass():
    cfg = load_config(None, ["actor_rollout_ref.rollout.kv_cache_gib_cpu=1.5", "trainer.nnodes=1",
                             "trainer.n_gpus_per_node=1", "actor_rollout_ref.rollout.top_p=1",
                             "actor_rollout_ref.rollout.temperature=0", "trainer.logger=console",
                             "critic.optim.lr=${actor_rollout_ref.actor.optim.lr}", "trainer.max_ckpt_to_keep=null"])
    assert cfg.actor_rollout_ref.rollout.kv_cache_gib_cpu == 1.5
    assert list(cfg.trainer.logger) == ["console"]  # verl's single-word form
    assert cfg.critic.optim.lr == cfg.actor_rollout_ref.actor.optim.lr


def test_the_rules_name_real_keys_and_type_every_null_default():
    """A rule for a key that is not in defaults.yaml would check nothing; a null default has no type."""
    schema = OmegaConf.load(DEFAULTS)
    leaves = dict(_leaves(schema))
    assert set(rules()) <= set(leaves), set(rules()) - set(leaves)
    untyped = [k for k, v in leaves.items() if v is None and not (k in rules() and (rules()[k].type or rules()[k].words))]
    assert not untyped, f"null defaults without a type in mcore_rl/config/rules.py: {untyped}"


@pytest.mark.parametrize("override,said", [
    ("trainer.zzqq=1", ""),  # nothing close: the section's keys
    ("trainer.max_stepz=3", "did you mean trainer.max_steps"),
    ("trainer.ppo_epochs=2", "did you mean actor_rollout_ref.actor.ppo_epochs or critic.ppo_epochs?"),
])
def test_an_unknown_key_fails_with_the_valid_keys_of_its_section(override, said):
    with pytest.raises(ConfigError) as e:
        read_config(None, [override])
    msg = str(e.value)
    assert msg.startswith(f"unknown config key {override.split('=')[0]!r} (from command line)") and said in msg
    assert msg.endswith("valid keys of trainer: " + ", ".join(SCHEMA.trainer.keys())), msg


def test_verl_total_epochs_is_refused_with_what_to_set(tmp_path):
    """verl bounds a run by epochs; here trainer.max_steps does, over as many passes as it takes."""
    verl = tmp_path / "verl.yaml"
    verl.write_text("trainer:\n  total_epochs: 15\n")
    for path, overrides in ((None, ["trainer.total_epochs=15"]), (verl, [])):
        with pytest.raises(ConfigError, match=r"unknown config key 'trainer.total_epochs' .*set trainer.max_steps"):
            read_config(path, overrides)


@pytest.mark.parametrize("text,msg", [
    ("data:\n  train_batch_size: [4\n", "is not valid YAML: did not find expected ',' or ']' at line 3"),
    ("data: {train_batch_size: 4\n", "is not valid YAML"),
    ("- data\n", "must be a YAML mapping"),
    ("data:\n  train_batch_size: 0\n", "data.train_batch_size=0: must be an integer >= 1"),
])
def test_bad_yaml_file(tmp_path, text, msg):
    f = tmp_path / "my.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(")):
        load_config(f, [])


def test_bad_values_stop_the_trainer_with_one_line(capsys):
    from mcore_rl.commands.train import main

    assert main(["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mcore-rl train: error: actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=0: "
                   "must be an integer >= 1 (default 8)")


# --- default batch sizes fitted to the user's batch -------------------------------------------

QUICK_START = ["data.dataset_name=toy", "data.train_batch_size=4", "trainer.max_steps=10", "trainer.log_interval=1"]


def test_a_small_batch_fits_the_preset_mini_batch_with_a_note(capsys):
    """verl's quick start sets only data.train_batch_size=4: the toy preset's mini-batch (32 prompts)
    and micro-batches (16) become 4, said in one line; the result passes the trainer's size check."""
    cfg = load_config(None, QUICK_START, world_size=1)
    a = cfg.actor_rollout_ref.actor
    assert (a.ppo_mini_batch_size, a.ppo_micro_batch_size_per_gpu, cfg.critic.ppo_micro_batch_size_per_gpu) == (4, 4, 4)
    check_sizes(cfg, 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo_mini_batch_size=4 (was 32)" in err[0] and "set them to choose" in err[0]
    # a batch the preset divides is left alone, and nothing is said
    cfg = load_config(None, ["data.train_batch_size=64"], world_size=1)
    assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 32 and capsys.readouterr().err == ""


def test_fitting_follows_the_data_parallel_size():
    """Two DP ranks and GRPO (n=8), a batch of 6 prompts: the preset's mini-batch (4) becomes 2, the
    largest divisor of 6 that DP=2 divides; each rank then holds 1 prompt x 8 samples of it, so the
    micro-batch (16) becomes 8."""
    cfg = load_config(REPO / "configs" / "toy_grpo.yaml", ["data.train_batch_size=6"], world_size=2)
    a = cfg.actor_rollout_ref.actor
    assert (a.ppo_mini_batch_size, a.ppo_micro_batch_size_per_gpu) == (2, 8)
    check_sizes(cfg, 2)


def test_sizes_the_user_wrote_are_never_changed(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_batch_size=4 is not a multiple of actor.ppo_mini_batch_size=32"):
        check_sizes(load_config(None, QUICK_START + ["actor_rollout_ref.actor.ppo_mini_batch_size=32"], world_size=1), 1)
    padded = ["actor_rollout_ref.actor.use_dynamic_bsz=false", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16"]
    with pytest.raises(ConfigError, match=r"is not divisible by DP=1 x actor.ppo_micro_batch_size_per_gpu=16"):
        check_sizes(load_config(None, QUICK_START + padded, world_size=1), 1)
    # packed micro-batches are sized by token budgets: the row count is not used, so not checked
    check_sizes(load_config(None, QUICK_START + padded[1:], world_size=1), 1)
    own = tmp_path / "mine.yaml"  # the user's own YAML counts as written by the user; a shipped preset does not
    own.write_text("actor_rollout_ref:\n  actor:\n    ppo_mini_batch_size: 32\n")
    cfg, explicit = read_config(own, ["data.train_batch_size=4"])
    assert {"actor_rollout_ref.actor.ppo_mini_batch_size", "data.train_batch_size"} <= explicit
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu" not in explicit
    with pytest.raises(ConfigError, match="not a multiple of actor.ppo_mini_batch_size=32"):
        check_sizes(load_config(own, ["data.train_batch_size=4"], world_size=1), 1)
    _, explicit = read_config(REPO / "configs" / "toy.yaml", [])
    assert explicit == set()


@pytest.mark.train
def test_verl_quick_start_line_runs(tmp_path, capsys):
    """The quick-start line as written (vLLM in place of SGLang, a local model in place of the hub id)."""
    from mcore_rl.toy import build_toy_model

    model = build_toy_model(tmp_path / "model")
    cmd = [sys.executable, "-m", "mcore_rl.commands.train", "data.dataset_name=toy", "data.train_batch_size=4",
           f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.rollout.name=vllm", "trainer.max_steps=10",
           "trainer.log_interval=1"]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "ppo_mini_batch_size=4 (was 32)" in r.stderr
    assert "step   10 |" in r.stdout and "Training completed" in r.stdout
    # the line as verl writes it (SGLang): refused before anything is built (checked in this process)
    import torch.distributed as dist

    from mcore_rl.commands.train import main

    capsys.readouterr()
    sglang = cmd[3:6] + ["actor_rollout_ref.rollout.name=sglang"] + cmd[7:]
    assert main(sglang + [f"trainer.output_dir={tmp_path / 'sglang'}"]) == 2
    assert "the rollout engine is vLLM" in capsys.readouterr().err and not dist.is_initialized()


# --- the presets ship in the wheel ------------------------------------------------------------

def test_wheel_ships_the_configs_and_the_loader_finds_them(tmp_path):
    """Build the wheel from a copy of the sources (the build writes build/ and *.egg-info), check the
    presets are inside it, and load them from an unpacked copy with no checkout on the path."""
    import shutil

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mcore_rl", "converters", "configs"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mcore_rl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    shipped = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert {f"mcore_rl/configs/{n}" for n in shipped} <= names, sorted(n for n in names if "configs" in n)

    probe = ("import mcore_rl, mcore_rl.config as c; from pathlib import Path\n"
             "assert Path(mcore_rl.__file__).is_relative_to(Path.cwd() / 'site'), mcore_rl.__file__\n"
             "assert c.CONFIG_DIR.is_relative_to(Path.cwd() / 'site'), c.CONFIG_DIR\n"
             "cfg = c.load_config(c.CONFIG_DIR / 'grpo.yaml', [])\n"
             "print(sorted(p.name for p in c.CONFIG_DIR.glob('*.yaml')), cfg.algorithm.adv_estimator)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={**env, "PYTHONPATH": str(tmp_path / "site")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f"{sorted(shipped)} grpo"
    plan = subprocess.run([sys.executable, "-m", "mcore_rl.cli", "plan"], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and "FITS" in plan.stdout, plan.stderr[-3000:]


def test_split_placement_sizes_are_checked_before_any_process_group():
    split = ["actor_rollout_ref.rollout.placement=split", "actor_rollout_ref.rollout.n_gpus=1"]
    cfg = load_config(None, split, world_size=3)
    check_sizes(cfg, 3)  # 2 train, 1 generates
    assert cfg.actor_rollout_ref.actor.ppo_mini_batch_size % 2 == 0  # fitted to DP=2 (the training ranks)
    cases = {
        "must leave both sides": (split, 1),
        "rollout.n_gpus=1 needs rollout.placement=split": (["actor_rollout_ref.rollout.n_gpus=1"], 2),
        "async_training.staleness=1 needs rollout.placement=split": (["async_training.staleness=1"], 1),
        "is not divisible by rollout TP=2": (split + ["actor_rollout_ref.rollout.tensor_model_parallel_size=2"], 3),
        "training ranks 3 is not divisible by TP=2": (split + ["actor_rollout_ref.actor.megatron.tensor_model_parallel_size=2"], 4),
    }
    for message, (overrides, world) in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_sizes(load_config(None, overrides, world_size=world), world)
    with pytest.raises(ConfigError, match="async_training.staleness=2"):
        load_config(None, split + ["async_training.staleness=2"], world_size=3)
    with pytest.raises(ConfigError, match="placement='both'"):
        load_config(None, ["actor_rollout_ref.rollout.placement=both"], world_size=1)
