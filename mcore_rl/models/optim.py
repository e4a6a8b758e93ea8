"""Wrap a model for training: megatron DDP (contiguous grad buffers, DP all-reduce or
reduce-scatter) and megatron's optimizer (Adam, fp32 master weights for bf16, optional
distributed optimizer, grad clipping); the learning-rate schedule over training steps."""

from __future__ import annotations

import torch


def wrap_for_training(model, lr: float = 1e-6, weight_decay: float = 0.0, clip_grad: float = 1.0,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      use_distributed_optimizer: bool = False, grad_reduce_in_fp32: bool = True,
                      min_lr: float = 0.0):
    """Returns (ddp_model, optimizer). `optimizer.step()` returns (ok, grad_norm, num_zeros)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer))
    ddp.mcore_rl_spec = model.mcore_rl_spec
    ddp.mcore_rl_role = model.mcore_rl_role
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=betas[0],
                        adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad,
                        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=use_distributed_optimizer),
        [ddp])
    return ddp, opt


LR_DECAY_STYLES = ("constant", "linear", "cosine")


def schedule_steps(optim, total_steps: int) -> tuple[int, int]:
    """(warmup steps, decay steps) of an `optim` config, resolved as verl does: decay over
    `lr_decay_steps` (default `total_steps`); warmup `lr_warmup_steps` when positive, else
    `lr_warmup_steps_ratio` of the decay steps."""
    decay = int(optim.lr_decay_steps) if optim.lr_decay_steps is not None else int(total_steps)
    warmup = int(optim.lr_warmup_steps) if optim.lr_warmup_steps > 0 else int(optim.lr_warmup_steps_ratio * decay)
    return warmup, decay


def schedule_problems(optim, total_steps: int, where: str) -> list[str]:
    """What would make megatron's scheduler fail later (empty: fine); checked at config load."""
    problems = []
    warmup, decay = schedule_steps(optim, total_steps)
    if not 0.0 <= optim.lr_warmup_steps_ratio < 1.0:
        problems.append(f"{where}.lr_warmup_steps_ratio={optim.lr_warmup_steps_ratio} must be in [0, 1)")
    if decay < 1:
        problems.append(f"{where}.lr_decay_steps={decay} must be >= 1")
    elif warmup >= decay:
        problems.append(f"{where}: {warmup} warmup steps must be fewer than the {decay} decay steps "
                        f"(lr_decay_steps, default trainer.max_steps)")
    if not 0.0 <= optim.min_lr <= optim.lr:
        problems.append(f"{where}.min_lr={optim.min_lr} must be in [0, lr={optim.lr}]")
    if not 0.0 <= optim.lr_warmup_init <= optim.lr:
        problems.append(f"{where}.lr_warmup_init={optim.lr_warmup_init} must be in [0, lr={optim.lr}]")
    return problems


class LRSchedule:
    """The learning rate of each training step: linear warmup from `lr_warmup_init` to `lr`, then
    constant, or linear / cosine decay to `min_lr` at `lr_decay_steps` (megatron-core's
    `OptimizerParamScheduler`, advanced once per training step as verl does: every mini-batch
    update of a step uses the same rate, and step 1 uses the rate at 0 steps).

    The rate is a function of the step number alone, so a resumed run continues the sequence
    of an uninterrupted one with nothing saved.
    """

    def __init__(self, optimizer, optim, total_steps: int):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        warmup, decay = schedule_steps(optim, total_steps)
        self.scheduler = OptimizerParamScheduler(
            optimizer, init_lr=float(optim.lr_warmup_init), max_lr=float(optim.lr), min_lr=float(optim.min_lr),
            lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=optim.lr_decay_style,
            start_wd=float(optim.weight_decay), end_wd=float(optim.weight_decay), wd_incr_steps=decay,
            wd_incr_style="constant")

    def set_step(self, step: int) -> float:
        """Give the optimizer the rate of training step `step` (1-based); returns it."""
        self.scheduler.num_steps = step - 1
        self.scheduler.step(0)
        return float(self.scheduler.optimizer.param_groups[0]["lr"])


def zero_grads(ddp, optimizer) -> None:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()


def main_grads(ddp) -> dict[str, torch.Tensor]:
    """Accumulated gradients by parameter name (the DDP buffer's `main_grad`)."""
    return {n: (p.main_grad if hasattr(p, "main_grad") else p.grad) for n, p in ddp.module.named_parameters()}
