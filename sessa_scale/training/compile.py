"""torch.compile for training (`train.compile: true`; `sessa-scale bench train --compile yes`): one helper
that the trainer and the bench share, so that the bench times the step the trainer runs."""

from __future__ import annotations

import contextlib

import torch

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_for_training(model, mode: str = "default") -> None:
    """torch.compile `model` in place for training: a DeepSpeed engine through its own compile()
    (which calls engine.module.compile with the accelerator's backend, "inductor" on CUDA and CPU),
    an nn.Module through nn.Module.compile (inductor). `mode` is torch.compile's: "default", or
    "max-autotune-no-cudagraphs" (inductor benchmarks Triton matmul templates against cuBLAS per shape
    and fuses pointwise epilogues into the templates it picks; compilation takes minutes longer).

    Both compile the module's forward in place rather than wrapping it (torch.compile(model) would
    return an OptimizedModule whose state-dict keys carry an `_orig_mod.` prefix): parameters,
    state-dict keys and checkpoints stay those of the eager model, so compiled and eager runs resume
    each other's checkpoints. The first step (and any new input shape) pays the compilation."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose from {list(COMPILE_MODES)}")
    kwargs = {} if mode == "default" else {"mode": mode}
    if hasattr(model, "module") and hasattr(model, "is_gradient_accumulation_boundary"):  # a DeepSpeed engine
        model.compile(compile_kwargs=kwargs)
    else:
        model.compile(**kwargs)


def eager_forward():
    """A context in which compiled modules run their eager forward (evaluation, whose no_grad forward
    would otherwise cost a second compilation for a few batches); a no-op before torch 2.6."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
