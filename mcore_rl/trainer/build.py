"""What a run is built from: the model checkpoint, the Megatron models and their optimizers, the
rollout engine. Called once by the trainer, after the config and inputs were checked."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from converters.hf_io import load_hf_into_model
from mcore_rl.config import needs_reference, uses_critic
from mcore_rl.models.arch import ArchSpec
from mcore_rl.models.build import build_model
from mcore_rl.models.lora import add_lora, lora_config
from mcore_rl.models.optim import LRSchedule, wrap_for_training
from mcore_rl.rollout import make_engine
from mcore_rl.toy import build_toy_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_output_dir(cfg: DictConfig) -> str:
    return os.path.join(os.getcwd(), "outputs", cfg.trainer.project_name, cfg.trainer.experiment_name)


def model_path(cfg: DictConfig, output_dir: str) -> str:
    """The HF checkpoint to start from: `actor_rollout_ref.model.path`, or for the toy dataset
    a toy model written under the output dir.

    The toy model is built before any process group exists: the first local rank of each node
    writes it (deterministic in the seed) to a temp dir renamed into place; the others wait."""
    path = cfg.actor_rollout_ref.model.path
    if path:
        return str(path)
    if cfg.data.dataset_name != "toy":
        raise ValueError("actor_rollout_ref.model.path is required (only the toy dataset builds its own model)")
    path = os.path.join(output_dir, "toy_model")
    os.makedirs(output_dir, exist_ok=True)
    if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0 and not os.path.isdir(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        build_toy_model(tmp, seed=cfg.trainer.seed)
        os.replace(tmp, path)
    deadline = time.time() + 600
    while not os.path.isdir(path):
        if time.time() > deadline:
            raise TimeoutError(f"waited 600 s for the toy model at {path}")
        time.sleep(0.2)
    return path


@dataclass
class Models:
    """The run's Megatron models (critic and reference only when the algorithm needs them; with
    LoRA no reference model: the actor with its adapters off is the reference policy)."""

    actor: object
    actor_opt: object
    actor_lr: LRSchedule
    critic: object | None = None
    critic_opt: object | None = None
    critic_lr: LRSchedule | None = None
    ref: object | None = None


def build_models(cfg: DictConfig, spec: ArchSpec, path: str) -> Models:
    """Actor (+ optimizer), critic (GAE only) and frozen reference (KL loss or KL in reward, without
    LoRA), each loaded from the HF checkpoint at `path`. With `actor_rollout_ref.model.lora_rank` the
    actor gets LoRA adapters and only they are trained (base frozen before its optimizer is built).
    Collective (process groups must exist)."""
    a = cfg.actor_rollout_ref
    dtype = DTYPES[a.model.dtype]
    lora = lora_config(a.model, spec)

    def model(role, optim=None):
        m = build_model(spec, role=role, dtype=dtype, transformer_impl=a.model.transformer_impl)
        load_hf_into_model(m, spec, path)
        if role == "actor" and lora is not None:
            add_lora(m, lora, seed=cfg.trainer.seed)
        if optim is None:
            return m, None
        return wrap_for_training(m, lr=optim.lr, weight_decay=optim.weight_decay, clip_grad=optim.clip_grad,
                                 betas=tuple(optim.betas), use_distributed_optimizer=a.actor.use_distributed_optimizer,
                                 min_lr=optim.min_lr)  # (the DDP-wrapped model, its optimizer)

    steps = cfg.trainer.max_steps
    actor, actor_opt = model("actor", a.actor.optim)
    models = Models(actor, actor_opt, LRSchedule(actor_opt, a.actor.optim, steps))
    if uses_critic(cfg):
        models.critic, models.critic_opt = model("critic", cfg.critic.optim)
        models.critic_lr = LRSchedule(models.critic_opt, cfg.critic.optim, steps)
    if needs_reference(cfg) and lora is None:
        models.ref = model("reference")[0]
    return models


def build_engine(cfg: DictConfig, path: str, sleep: bool | None = None):
    """The rollout engine for this rank (vLLM or the HF reference engine), at the rollout TP size.
    `sleep`: whether it frees its memory between rollouts (default: rollout.free_cache_engine)."""
    r = cfg.actor_rollout_ref.rollout
    adapter = r.lora_sync == "adapter"  # (the config check made sure the actor has LoRA)
    engine = make_engine(
        r.name, model_path=path, tensor_parallel_size=r.tensor_model_parallel_size,
        dtype=cfg.actor_rollout_ref.model.dtype, seed=cfg.trainer.seed,
        gpu_memory_utilization=r.gpu_memory_utilization,
        max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length,
        enforce_eager=r.enforce_eager, kv_cache_gib_cpu=r.kv_cache_gib_cpu, kv_cache_gib=r.kv_cache_gib,
        enable_sleep_mode=bool(r.free_cache_engine) if sleep is None else sleep, logprobs_mode=r.logprobs_mode.removesuffix("_logprobs"),
        **({"max_lora_rank": cfg.actor_rollout_ref.model.lora_rank} if adapter else {}))
    if adapter and not engine.serves_lora:
        engine.close()
        raise ValueError(f"actor_rollout_ref.rollout.lora_sync=adapter: the {type(engine).__name__} rollout engine does "
                         f"not serve LoRA adapters (vLLM does; or use lora_sync=merged)")
    return engine
