"""Megatron DDP and optimizer construction (the training side of the Megatron seam)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True


def ddp_config(optim: OptimConfig):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=optim.use_distributed_optimizer, check_for_nan_in_grad=False)


def build_optimizer(chunks: list, optim: OptimConfig, dtype: torch.dtype = torch.float32):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, use_distributed_optimizer=optim.use_distributed_optimizer,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype)
    return get_megatron_optimizer(cfg, chunks)
