"""Apply tensor (+ sequence) parallelism to a DecoderLM built for one device.

`parallelize(model, tp_group, sequence_parallel)` replaces modules in place following the
architecture's plan (sessa_scale.distributed.tp_plan) with megatron-core layers whose weights are
sliced from the model's own, seeded, full initialization: a tp=2 model computes exactly what the
tp=1 model of the same seed computes. Between blocks activations are sequence-first (T, B, D) as in
Megatron; under sequence parallelism each TP rank holds T/tp of the sequence there (see tp_plan).

    embed: VocabParallelEmbedding (rows split; reduce-scatter to sequence shards under SP)
    blocks: the plan (Column/Row/RowToHidden/Shard/Replicated/Heads)
    norm -> lm_head: ColumnParallelLinear over the vocabulary (tied to the embedding if the
    model ties them) -> vocab_parallel_cross_entropy; logits are never gathered for the loss.

Megatron-core's collectives allocate with torch.cuda.current_device(); they run on GPUs (NCCL).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not used here
    warnings.simplefilter("ignore")
    from megatron.core import ModelParallelConfig, tensor_parallel

from sessa_scale.distributed.tp_plan import block_plan, shard
from sessa_scale.distributed.tp_styles import Column, Heads, Norm, Replicated, Row, RowToHidden, Shard
from sessa_scale.models.lm import DecoderLM


def _plain_state_dict(module: nn.Module) -> None:
    """Drop megatron's `_extra_state` (always None for these layers): state dicts then hold exactly
    the single-device model's keys, which DeepSpeed's universal-checkpoint converter needs."""
    module._load_state_dict_pre_hooks.clear()


class _ColumnLinear(tensor_parallel.ColumnParallelLinear):
    """megatron ColumnParallelLinear built from an nn.Linear (rows sliced per `chunks`), returning
    only its output (bias added inside). Parameter names stay `weight`, `bias`."""

    def __init__(self, linear: nn.Linear, chunks: int, config, tp_group, reduce_input_grad: bool):
        # reduce_input_grad=False inside blocks: the input came through a Norm or Heads gather, whose
        # backward already sums the partial input gradients over TP.
        super().__init__(
            linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
            bias=linear.bias is not None, gather_output=False, tp_group=tp_group,
            disable_grad_reduce=not reduce_input_grad,
        )  # fmt: skip
        _plain_state_dict(self)
        _copy_shard(self.weight, linear.weight, 0, chunks, tp_group)
        if linear.bias is not None:
            _copy_shard(self.bias, linear.bias, 0, chunks, tp_group)

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


class _RowLinear(tensor_parallel.RowParallelLinear):
    """megatron RowParallelLinear (input features split): batch-first (B, T, in/tp) -> the summed
    output in the residual stream's layout, (T/tp, B, out) under SP, else (T, B, out)."""

    def __init__(self, linear: nn.Linear, config, tp_group):
        super().__init__(
            linear.in_features, linear.out_features, config=config, init_method=nn.init.zeros_,
            bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )  # fmt: skip
        _plain_state_dict(self)
        _copy_shard(self.weight, linear.weight, 1, 1, tp_group)
        if linear.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias)

    get_extra_state, set_extra_state = nn.Module.get_extra_state, nn.Module.set_extra_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(0, 1))[0]


class _RowToHiddenLinear(nn.Module):
    """x (..., in/tp) -> (..., out/tp): a bias-free linear on this rank's input features whose partial
    outputs are reduce-scattered over the last dim (rank r gets output columns [r*out/tp, ...))."""

    def __init__(self, linear: nn.Linear, tp_group):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("RowToHidden supports bias-free linears only")
        self.tp_group = tp_group
        self.weight = nn.Parameter(shard(linear.weight.detach(), 1, 1, tp_group.rank(), tp_group.size()))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tensor_parallel.reduce_scatter_last_dim_to_tensor_parallel_region(F.linear(x, self.weight), group=self.tp_group)


def _copy_shard(dst: nn.Parameter, full: torch.Tensor, dim: int, chunks: int, tp_group) -> None:
    with torch.no_grad():
        dst.copy_(shard(full.detach(), dim, chunks, tp_group.rank(), tp_group.size()))
    if not hasattr(dst, "tensor_model_parallel"):  # megatron marks biases itself, weights only when it inits them
        tensor_parallel.set_tensor_model_parallel_attributes(dst, True, dim, 1)


def _install_heads(module: nn.Module, style: Heads, tp_group) -> None:
    """Divide the head counts; gather a column-split input over the hidden dim (backward:
    reduce-scatter, which sums the partial gradients of the local heads)."""
    for attr in style.attrs:
        setattr(module, attr, getattr(module, attr) // tp_group.size())
    if style.gather_input:
        module.register_forward_pre_hook(
            lambda _m, args: (tensor_parallel.all_gather_last_dim_from_tensor_parallel_region(args[0], group=tp_group), *args[1:])
        )


class _SumGradientOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over TP. (megatron's copy_to region
    all-reduces a contiguous *copy* and returns the original, so a non-contiguous gradient, as a
    transpose produces, would pass through unreduced.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _install_norm(module: nn.Module, tp_group, sequence_parallel: bool) -> None:
    """Residual stream (T or T/tp, B, D) -> norm -> full sequence, batch-first (B, T, D). The backward
    sums the partial gradients of the column-parallel consumers (reduce-scatter under SP, else
    all-reduce)."""

    def leave(_module, _args, out):
        if sequence_parallel:
            out = tensor_parallel.gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=True, group=tp_group)
        else:
            out = _SumGradientOverTP.apply(out, tp_group)
        return out.transpose(0, 1)

    module.register_forward_hook(leave)


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


def _parallelize_block(block: nn.Module, plan: dict, inner, entry, tp_group, sequence_parallel: bool) -> list:
    """Apply `plan` to one block in place; returns the replicated parameters with partial gradients."""
    partial = []
    size, rank = tp_group.size(), tp_group.rank()
    for path, style in plan.items():
        parent, leaf = _resolve(block, path)
        target = getattr(parent, leaf)
        if isinstance(style, Norm):
            _install_norm(target, tp_group, sequence_parallel)
        elif isinstance(style, Column):
            setattr(parent, leaf, _ColumnLinear(target, style.chunks, inner, tp_group, reduce_input_grad=False))
        elif isinstance(style, Row):
            setattr(parent, leaf, _RowLinear(target, entry, tp_group))
        elif isinstance(style, RowToHidden):
            setattr(parent, leaf, _RowToHiddenLinear(target, tp_group))
        elif isinstance(style, Shard):
            new = nn.Parameter(shard(target.detach(), style.dim, 1, rank, size))
            tensor_parallel.set_tensor_model_parallel_attributes(new, True, style.dim, 1)
            setattr(parent, leaf, new)
        elif isinstance(style, Replicated):
            partial += list(target.parameters()) if isinstance(target, nn.Module) else [target]
        elif isinstance(style, Heads):
            _install_heads(target, style, tp_group)
        else:
            raise TypeError(f"unknown tensor-parallel style {style!r} for {path}")
    return partial


def _all_reduce_grad_hook(tp_group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=tp_group)
        return grad

    return hook


class TensorParallelLM(DecoderLM):
    """A DecoderLM after `parallelize`: forward(tokens, targets) -> the mean loss, identical on every
    TP rank; forward(tokens) -> full logits (B, T, V) gathered over the vocabulary."""

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(tokens)  # (T/tp, B, D) under SP (megatron reduce-scatters), else (B, T, D)
        if not self.sequence_parallel:
            x = x.transpose(0, 1)
        logits = self._logits(self.run_blocks(x))  # (T, B, V/tp)
        if targets is None:
            return tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.tp_group).transpose(0, 1)
        return tensor_parallel.vocab_parallel_cross_entropy(logits, targets.t().contiguous()).mean()

    def init_cache(self, *args, **kwargs):
        raise NotImplementedError("decoding runs on one device: load the merged checkpoint (sessa_scale.checkpoint.merge.load_model)")


def parallelize(model: DecoderLM, tp_group, sequence_parallel: bool) -> TensorParallelLM:
    """Split `model` (a DecoderLM on one device, fully initialized) across `tp_group` in place."""
    cfg = model.cfg
    size = tp_group.size()
    dtype = model.embed.weight.dtype
    sp = sequence_parallel and size > 1

    def config(seq: bool):
        return ModelParallelConfig(
            tensor_model_parallel_size=size, sequence_parallel=seq, use_cpu_initialization=True,
            perform_initialization=False, params_dtype=dtype,
        )  # fmt: skip

    # Column layers inside blocks see the full sequence (their Norm gathered it); Row layers,
    # the embedding and the LM head follow megatron's sequence-parallel layout.
    inner, entry = config(False), config(sp)
    plan = block_plan(cfg)
    partial = []
    for block in model.layers:
        partial += _parallelize_block(block, plan, inner, entry, tp_group, sp)

    embed = tensor_parallel.VocabParallelEmbedding(
        cfg.vocab_size, cfg.d_model, init_method=nn.init.zeros_, reduce_scatter_embeddings=sp, config=entry, tp_group=tp_group
    )
    _copy_shard(embed.weight, model.embed.weight, 0, 1, tp_group)
    head = _ColumnLinear(model.lm_head, 1, entry, tp_group, reduce_input_grad=True)
    model.embed = embed
    model.lm_head = head
    if cfg.tie_embeddings:
        head.weight = embed.weight
    model.__class__ = TensorParallelLM
    model.tp_group, model.sequence_parallel = tp_group, sp

    tp_params = {id(p) for p in model.parameters() if getattr(p, "tensor_model_parallel", False)}
    if sp:  # every replicated parameter sees only a sequence shard
        partial = [p for p in model.parameters() if id(p) not in tp_params]
    for p in {id(p): p for p in partial}.values():
        p.register_hook(_all_reduce_grad_hook(tp_group))
        p.tp_partial_grad = True
    return model
