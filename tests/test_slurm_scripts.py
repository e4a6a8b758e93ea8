"""The Slurm scripts, read as text (no Slurm needed): every `key=value` override that a script in
slurm/ passes to the trainer, or shows in its usage, is a key of the trainer's config schema.

A key the schema does not know makes the trainer stop with "unknown config key" before any
work, so a script passing one cannot start a run at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mcore_rl.config import DEFAULTS, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
DOCS = [REPO / "slurm" / "README.md"]

# A dotted lower-case key (at least two parts) directly followed by `=`: `trainer.resume=auto`,
# "critic.optim.lr=$LR". Environment variables (TP=8) and sbatch options (--nodes=4) have no
# dot; module paths (-m mcore_rl.cli) have no `=`.
OVERRIDE = re.compile(r"(?<![\w.$/-])([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=([^\s\"'`)]*)")
# What the shell fills in at run time ($VAR, ${VAR...}, $(...), a glob in a `case` pattern) or
# a placeholder in a usage line (`...`).
PLACEHOLDER = re.compile(r"[$*]|^\.\.\.$|^$")


def overrides_in(text: str) -> list[tuple[str, str, int]]:
    """(key, value as written, line number) for every override token in a script's text."""
    return [(m.group(1), m.group(2).rstrip(".,;:") if m.group(2) != "..." else "...", text.count("\n", 0, m.start()) + 1)
            for m in OVERRIDE.finditer(text)]


def _validatable(key: str, value: str) -> str:
    """`key=value` to hand to load_config. Values that the shell supplies at run time are
    replaced with the schema default (or 1 when the key is unknown: then the key fails)."""
    if not PLACEHOLDER.search(value):
        return f"{key}={value}"
    default = OmegaConf.select(OmegaConf.load(DEFAULTS), key, default=1)
    return f"{key}={'null' if default is None else default}" if not OmegaConf.is_config(default) else f"{key}=1"


def test_parser_finds_the_overrides_of_a_known_line():
    text = ('exec bash x \\\n    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=$TP" \\\n'
            '    "trainer.nnodes=$NNODES" "trainer.n_gpus_per_node=${PER_NODE}" \\\n'
            '# sbatch --nodes=4 slurm/x.sbatch trainer.output_dir=/shared/runs/$NAME data.seed=1\n'
            'case " $A " in *" trainer.resume="*) ;; esac\nTP=${TP:-8}; python -m mcore_rl.cli plan --nodes=2\n')
    assert overrides_in(text) == [
        ("actor_rollout_ref.actor.megatron.tensor_model_parallel_size", "$TP", 2),
        ("trainer.nnodes", "$NNODES", 3), ("trainer.n_gpus_per_node", "${PER_NODE}", 3),
        ("trainer.output_dir", "/shared/runs/$NAME", 4), ("data.seed", "1", 4),
        ("trainer.resume", "", 5)]
    assert _validatable("trainer.resume", "") == "trainer.resume=auto"
    assert _validatable("data.seed", "7") == "data.seed=7"


def test_load_config_rejects_what_this_test_relies_on():
    """The check below is only as good as load_config's refusal of unknown keys."""
    with pytest.raises(ConfigError, match="critic.megatron"):
        load_config(overrides=["critic.megatron.tensor_model_parallel_size=2"])
    load_config(overrides=["critic.ppo_micro_batch_size_per_gpu=8"])


@pytest.mark.parametrize("path", SCRIPTS + DOCS, ids=lambda p: p.name)
def test_every_override_in_the_slurm_scripts_is_a_config_key(path):
    found = overrides_in(path.read_text())
    if path.suffix == ".sbatch" and path.name != "convert.sbatch":
        # train.sbatch appends trainer.resume=auto; multinode_tp_pp.sbatch sets the TP/PP sizes.
        assert found, f"no overrides found in {path.name}: the parser no longer matches the script"
    bad = []
    for key, value, line in found:
        try:
            load_config(overrides=[_validatable(key, value)])
        except ConfigError as e:
            bad.append(f"{path.name}:{line}: {key}={value}: {e}")
    assert not bad, "\n".join(bad)


def test_multinode_script_sets_the_parallel_sizes():
    """The script's purpose, as overrides: TP and PP of the actor, the rollout TP, the node shape."""
    keys = {k for k, _, _ in overrides_in((REPO / "slurm" / "multinode_tp_pp.sbatch").read_text())}
    assert {"actor_rollout_ref.actor.megatron.tensor_model_parallel_size",
            "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size",
            "actor_rollout_ref.rollout.tensor_model_parallel_size", "trainer.nnodes", "trainer.n_gpus_per_node"} <= keys
