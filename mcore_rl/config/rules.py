"""What a config value may be, beyond the type of its default in `configs/defaults.yaml`.

One row per key; a key not listed here is checked only against its default's type (so a key
added to defaults.yaml is typed at once). Relations between keys (batch sizes that must
divide, TP against heads) are `check_sizes`'s, not this table's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from omegaconf import ListConfig


@dataclass(frozen=True)
class Rule:
    type: type | None = None  # for keys whose default is null (else the default's type)
    lo: float | None = None  # lo <= value (lo < value with open_lo)
    hi: float | None = None  # value <= hi
    open_lo: bool = False
    words: tuple = ()  # the value is one of these
    items: tuple = ()  # a list whose items are among these
    length: int | None = None  # a list of exactly this many items
    null: bool = False  # null is a value of its own (said in defaults.yaml) though the default is not null
    what: str = ""  # what the value must be, in words, where its type does not say it

    def describe(self) -> str:
        """What the value must be, in words: "an integer >= 1", "a list of 2 numbers in [0, 1]"."""
        if self.what:
            return self.what
        if self.words:
            return "one of " + ", ".join(map(str, self.words))
        if self.items:
            return "a list of " + ", ".join(self.items)
        if self.length:
            return f"a list of {self.length} numbers" + self._range()
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                PATHS: "a path or a list of paths"}.get(self.type, "a value")
        return kind + self._range()

    def _range(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f" in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f" {'>' if self.open_lo else '>='} {self.lo:g}"
        return ""


PATHS = (str, ListConfig)  # one file / folder, or several
POSITIVE = Rule(type=int, lo=1)
NON_NEGATIVE = Rule(type=float, lo=0)
FRACTION = Rule(type=float, lo=0, hi=1)  # a probability, or gamma / lambda
SHARE = Rule(type=float, lo=0, hi=1, open_lo=True)  # top_p, memory fraction: 0 would mean nothing
BETAS = Rule(type=float, lo=0, hi=1, length=2)
OPTIM = {"lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "clip_grad": NON_NEGATIVE, "betas": BETAS}


def _under(prefix: str, rules: dict[str, Rule]) -> dict[str, Rule]:
    return {f"{prefix}.{k}": r for k, r in rules.items()}


@cache
def rules() -> dict[str, Rule]:
    """The table. Word lists of estimators and loss modes come from the modules that define them."""
    from mcore_rl.algorithms.advantages import ADV_ESTIMATORS
    from mcore_rl.algorithms.losses import AGG_MODES, KL_KINDS
    from mcore_rl.algorithms.rollout_correction import IS_LEVELS, IS_MODES
    from mcore_rl.models.optim import LR_DECAY_STYLES
    from mcore_rl.trainer.inputs import LOGGERS

    agg, kl = Rule(words=tuple(AGG_MODES)), Rule(words=tuple(KL_KINDS))
    decay = {"lr_decay_style": Rule(words=tuple(LR_DECAY_STYLES)), "lr_decay_steps": POSITIVE,
             "lr_warmup_steps_ratio": FRACTION, "lr_warmup_init": NON_NEGATIVE, "min_lr": NON_NEGATIVE}
    return {
        "data.train_batch_size": POSITIVE,
        "data.max_prompt_length": POSITIVE,
        "data.max_response_length": POSITIVE,
        "data.answer_key": Rule(type=str),
        "data.apply_chat_template": Rule(words=("auto", "true", "false")),
        "data.on_bad_row": Rule(words=("skip", "error")),
        "data.seed": Rule(type=int, lo=0),
        "data.toy_size": POSITIVE,
        "data.val_files": Rule(type=PATHS),
        "actor_rollout_ref.model.path": Rule(type=str),
        "actor_rollout_ref.model.dtype": Rule(words=("float32", "bfloat16", "float16")),
        "actor_rollout_ref.model.transformer_impl": Rule(words=("local", "transformer_engine")),
        "actor_rollout_ref.model.lora_rank": Rule(type=int, lo=0),
        "actor_rollout_ref.model.lora_alpha": Rule(type=float, lo=0, open_lo=True),
        "actor_rollout_ref.model.target_modules": Rule(
            type=(str, ListConfig), what="all-linear, or module names (a list, or one string separated by commas)"),
        **_under("actor_rollout_ref.actor.optim", {**OPTIM, **decay}),
        "actor_rollout_ref.actor.ppo_mini_batch_size": POSITIVE,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": POSITIVE,
        "actor_rollout_ref.actor.ppo_epochs": POSITIVE,
        "actor_rollout_ref.actor.clip_ratio_low": FRACTION,
        "actor_rollout_ref.actor.clip_ratio_high": NON_NEGATIVE,
        "actor_rollout_ref.actor.clip_ratio_c": Rule(type=float, lo=1, open_lo=True),
        "actor_rollout_ref.actor.loss_agg_mode": agg,
        "actor_rollout_ref.actor.policy_loss": Rule(words=("vanilla", "gspo", "cispo")),
        "actor_rollout_ref.actor.kl_loss_coef": NON_NEGATIVE,
        "actor_rollout_ref.actor.kl_loss_type": kl,
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size": POSITIVE,
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size": POSITIVE,
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": POSITIVE,
        "actor_rollout_ref.rollout.name": Rule(words=("auto", "vllm", "hf")),
        "actor_rollout_ref.rollout.n": POSITIVE,
        "actor_rollout_ref.rollout.placement": Rule(words=("colocated", "split")),
        "actor_rollout_ref.rollout.n_gpus": Rule(type=int, lo=0),
        "async_training.staleness": Rule(type=int, lo=0, hi=1),
        "actor_rollout_ref.rollout.temperature": NON_NEGATIVE,
        "actor_rollout_ref.rollout.top_p": SHARE,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": POSITIVE,
        "actor_rollout_ref.rollout.gpu_memory_utilization": SHARE,
        "actor_rollout_ref.rollout.enforce_eager": Rule(type=bool),
        "actor_rollout_ref.rollout.sync_fast_path": Rule(words=("auto", "off")),
        "actor_rollout_ref.rollout.lora_sync": Rule(words=("merged", "adapter")),
        "actor_rollout_ref.rollout.val_kwargs.n": POSITIVE,
        "actor_rollout_ref.rollout.val_kwargs.top_p": SHARE,
        "actor_rollout_ref.rollout.logprobs_mode": Rule(words=("raw_logprobs", "processed_logprobs")),
        "actor_rollout_ref.rollout.kv_cache_gib_cpu": Rule(type=float, lo=0, open_lo=True),
        "actor_rollout_ref.rollout.kv_cache_gib": Rule(type=float, lo=0, open_lo=True),
        "actor_rollout_ref.rollout.sync_bucket_mb": POSITIVE,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": POSITIVE,
        **_under("critic.optim", {**OPTIM, **decay}),
        "critic.ppo_micro_batch_size_per_gpu": POSITIVE,
        "critic.ppo_epochs": POSITIVE,
        "critic.cliprange_value": NON_NEGATIVE,
        "critic.loss_agg_mode": agg,
        "algorithm.adv_estimator": Rule(words=tuple(ADV_ESTIMATORS)),
        "algorithm.gamma": FRACTION,
        "algorithm.lam": FRACTION,
        "algorithm.kl_penalty": kl,
        "algorithm.kl_ctrl.kl_coef": NON_NEGATIVE,
        "algorithm.rollout_is_level": Rule(words=tuple(IS_LEVELS)),
        "algorithm.rollout_is_mode": Rule(words=tuple(IS_MODES)),
        "algorithm.rollout_is_threshold": Rule(type=float, lo=0, open_lo=True),
        "algorithm.rollout_is_threshold_lower": Rule(type=float, lo=0, open_lo=True),
        "algorithm.rollout_is_veto_threshold": Rule(type=float, lo=0, open_lo=True),
        "algorithm.overlong_buffer.len": POSITIVE,
        "algorithm.overlong_buffer.penalty_factor": NON_NEGATIVE,
        "trainer.max_steps": POSITIVE,
        "trainer.log_interval": POSITIVE,
        "trainer.seed": Rule(type=int, lo=0),
        "trainer.output_dir": Rule(type=str),
        "trainer.logger": Rule(items=tuple(LOGGERS)),
        "trainer.device": Rule(words=("auto", "cpu", "cuda")),
        "trainer.nnodes": POSITIVE,
        "trainer.n_gpus_per_node": POSITIVE,
        "trainer.dist_timeout_s": Rule(type=float, lo=0, open_lo=True),
        "trainer.resume": Rule(type=str),  # auto | off | PATH
        "trainer.max_ckpt_to_keep": Rule(type=int, lo=1, null=True),  # null keeps all
        "trainer.max_bad_steps": POSITIVE,
    }


# Words that YAML reads as booleans (`key=off` arrives as False), for keys where such a word is a
# value of its own: the boolean is turned back into the key's word.
FALSE_WORDS, TRUE_WORDS = ("off", "false", "no"), ("on", "true", "yes")
BOOLEAN_WORDS = {"trainer.resume": ("auto", "off")}

# Values the schema names but the package does not support yet, with what to do instead.
NOT_YET = {("actor_rollout_ref.rollout.name", "sglang"):
           "SGLang is not supported; the rollout engine is vLLM (actor_rollout_ref.rollout.name=vllm, or auto)"}

# verl keys that have no home here, with what to write instead (an unknown key all the same).
NOT_KEYS = {"trainer.total_epochs": "a run ends at trainer.max_steps, however many passes over the data that "
                                    "takes (the prompts are reshuffled each pass); set trainer.max_steps instead"}
