"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch

from sessa_scale.config import OptimConfig


def adamw_implementation(params) -> dict:
    """torch.optim.AdamW's implementation keywords for these parameters: {"fused": True} (torch's fused
    CUDA kernel: the whole step in a few launches instead of foreach's many) when every parameter is a
    floating-point CUDA tensor, else {} (torch's default: foreach on CUDA, the per-parameter loop on
    CPU, so CPU runs step exactly as before). Same update either way, up to float rounding.

    Under DeepSpeed the engine steps this torch optimizer itself at ZeRO stage 0, and ZeRO 1-3 replace
    its param groups' tensors by flat fp32 partitions on the same CUDA device, which the fused kernel
    takes as well (ZeRO with zero.offload_optimizer uses DeepSpeedCPUAdam instead)."""
    params = list(params)
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW; weight decay applies to parameters with >= 2 dims (matrices, embeddings); biases, norm
    weights and the feedback gains are not decayed. Fused on CUDA (adamw_implementation).
    cpu_offload: DeepSpeed's vectorized CPU AdamW (same update), for optimizer states offloaded by ZeRO."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **adamw_implementation(decay + no_decay)
    )


def restore_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After a checkpoint load: give a torch AdamW back the implementation adamw_implementation picks
    for its current parameters. Optimizer.load_state_dict replaces each param group's settings by the
    saved ones, the fused/foreach flags included, and DeepSpeed's ZeRO and universal loaders write
    state["step"] as saved; so a checkpoint from another implementation (an older unfused run, a CPU
    run) would switch this run's implementation or leave step counters on a device the kernel does
    not expect (fused: a float32 tensor on the parameter's device; otherwise on the CPU). Values
    (lr, betas, moments, step counts) are untouched; a run resuming its own checkpoints is unchanged."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        impl = adamw_implementation(group["params"])
        group["fused"], group["foreach"] = impl.get("fused"), impl.get("foreach")
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if not torch.is_tensor(step):
                continue
            if group["fused"] or group.get("capturable"):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
            elif step.device.type != "cpu":
                optimizer.state[p]["step"] = step.cpu()


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based count of completed steps): linear warmup
    over warmup_steps, cosine decay to min_lr at decay_steps (default max_steps), then min_lr."""
    decay_steps = cfg.decay_steps or max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, cfg: OptimConfig) -> None:
    """After a checkpoint load: make this run's optim config the one in force. Loading restores the
    saved param-group settings (lr, betas, eps, weight_decay) and the scheduler's base learning rates;
    this sets them from `cfg` (the decay group is build_optimizer's first) and the current learning
    rate to the new schedule's value at the restored step, so a changed optim.lr, schedule or AdamW
    setting applies from the next step as if configured so from the start. A run resumed with its own
    config gets back exactly the values it saved (same expressions as LambdaLR's)."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for i, (group, base, factor) in enumerate(zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas)):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["eps"] = cfg.eps
        if i == 0:
            group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
