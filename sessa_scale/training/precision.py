"""Compute precision (`train.precision`): one rule for the trainer (through DeepSpeed's config) and
for everything that runs a model outside the engine (evaluation, benchmarks).

bf16 is mixed precision: weights, gradients and AdamW state stay float32; matrix products (every
nn.Linear and the feedback solve, which runs in the dtype of its inputs) compute in bfloat16 under
torch.autocast; losses, norms and softmax statistics stay float32 (autocast's float32 op list and the
model's own upcasts).

Inside the DeepSpeed engine the autocast comes from the engine's `torch_autocast` section, not from
an outer `torch.autocast`: the engine disables an outer autocast on CUDA unless its own section is
enabled (an outer context silently trained in float32). DeepSpeed's `bf16` mode was not chosen: it
casts the model's parameters to bf16 (norm gains, the feedback gains and the RoPE tables too) and
keeps float32 masters only in its ZeRO optimizers, which changes the model's numerics and the
checkpoints' dtypes; torch_autocast keeps both exactly as on CPU and in the evaluation path.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """bfloat16 for "bf16", and for "auto" on CUDA; float32 otherwise."""
    device_type = torch.device(device).type
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast(precision: str, device: torch.device | str, cache: bool = True):
    """The autocast context for running a model outside the DeepSpeed engine (evaluation,
    benchmarks, the capture of train.cuda_graphs): bf16 autocast when compute_dtype is bfloat16, else
    no context. cache: autocast's weight-cast cache (off while capturing CUDA graphs)."""
    device_type = torch.device(device).type
    if compute_dtype(precision, device) == torch.bfloat16:
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def deepspeed_precision_config(precision: str, device: torch.device | str) -> dict:
    """The DeepSpeed config section that sets the engine's compute precision.

    bf16: {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}:
    the engine runs its forward under bf16 autocast. The empty module list keeps every gradient's
    data-parallel reduction in float32 (DeepSpeed would otherwise reduce nn.Linear gradients in bf16).
    fp32: {} (the engine's default, float32 throughout)."""
    if compute_dtype(precision, device) == torch.bfloat16:
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    return {}
