"""Megatron DDP, optimizer and learning-rate schedule construction (the training side of the
Megatron seam)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

LR_DECAY_STYLES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    lr: float = 1e-5  # MATPO trains at a constant 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    lr_warmup_steps: int = 0  # linear warmup from 0 to `lr` over this many optimizer steps
    lr_decay_style: str = "constant"  # after warmup: constant | linear | cosine (down to min_lr)
    # peak lr of the output layer alone (None: `lr`); it follows the same warmup/decay shape, down to
    # min_lr * output_layer_lr / lr. Small randomly initialised models learn a few answer tokens
    # through this layer, while an Adam step of lr on every other weight re-randomises them.
    output_layer_lr: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, total_steps: int | None = None) -> "OptimConfig":
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"optim.lr_decay_style: {self.lr_decay_style!r}, expected one of "
                             f"{', '.join(LR_DECAY_STYLES)}")
        if self.lr < 0:
            raise ValueError(f"optim.lr: {self.lr} must be >= 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr: {self.min_lr} must be in [0, lr={self.lr}]")
        if self.output_layer_lr is not None and self.output_layer_lr < 0:
            raise ValueError(f"optim.output_layer_lr: {self.output_layer_lr} must be >= 0 (or null: optim.lr)")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"optim.lr_warmup_steps: {self.lr_warmup_steps} must be >= 0")
        if total_steps is not None:
            if total_steps < 1:
                raise ValueError(f"total_steps={total_steps} must be >= 1")
            if self.lr_warmup_steps >= total_steps:
                raise ValueError(f"optim.lr_warmup_steps: {self.lr_warmup_steps} must be < total_steps={total_steps}")
        return self


def ddp_config(optim: OptimConfig):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
        use_distributed_optimizer=optim.use_distributed_optimizer, check_for_nan_in_grad=False)


def build_optimizer(chunks: list, optim: OptimConfig, dtype: torch.dtype = torch.float32):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey

    cfg = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, use_distributed_optimizer=optim.use_distributed_optimizer,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype)
    overrides = get_standard_config_overrides(cfg)  # megatron's own: no weight decay on biases/norms
    if optim.output_layer_lr is not None:
        min_lr = optim.min_lr * optim.output_layer_lr / optim.lr if optim.lr else 0.0
        overrides[ParamKey(name="*output_layer.weight")] = {"max_lr": optim.output_layer_lr, "min_lr": min_lr}
    return get_megatron_optimizer(cfg, chunks, config_overrides=overrides)


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """megatron-core's `OptimizerParamScheduler` over `total_steps` optimizer steps.

    Call `scheduler.step(1)` after each `optimizer.step()`. Construction sets every param group's
    lr for step 0 (0 during warmup, else `lr`). Weight decay stays constant. The schedule's own
    settings come from `optim` on resume (the config wins over the checkpoint, so a run can be
    extended or re-tuned); only the step count is taken from the checkpoint.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optim.validate(total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_steps else optim.lr,
        max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=total_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=total_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
