"""Wrap a model for training: megatron DDP (contiguous grad buffers, DP all-reduce or
reduce-scatter) and megatron's optimizer (Adam, fp32 master weights for bf16, optional
distributed optimizer, grad clipping)."""

from __future__ import annotations

import torch


def wrap_for_training(model, lr: float = 1e-6, weight_decay: float = 0.0, clip_grad: float = 1.0,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                      use_distributed_optimizer: bool = False, grad_reduce_in_fp32: bool = True):
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
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                        adam_beta2=betas[1], adam_eps=eps, clip_grad=clip_grad,
                        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                        use_distributed_optimizer=use_distributed_optimizer),
        [ddp])
    return ddp, opt


def zero_grads(ddp, optimizer) -> None:
    ddp.zero_grad_buffer()
    optimizer.zero_grad()


def main_grads(ddp) -> dict[str, torch.Tensor]:
    """Accumulated gradients by parameter name (the DDP buffer's `main_grad`)."""
    return {n: (p.main_grad if hasattr(p, "main_grad") else p.grad) for n, p in ddp.module.named_parameters()}
