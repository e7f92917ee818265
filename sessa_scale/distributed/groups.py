"""Tensor- and data-parallel process groups from megatron-core's parallel_state, and the `mpu`
object DeepSpeed reads them through.

Ranks are laid out as Megatron does: consecutive global ranks form a TP group (the GPUs of a
node share NVLink), and rank r's data-parallel group holds the ranks with the same TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch

from sessa_scale.errors import UserError


def _parallel_state():
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not used here
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state
    return parallel_state


@dataclass(frozen=True)
class ParallelLayout:
    tp: int  # tensor-parallel size
    dp: int  # data-parallel size (world / tp)
    tp_rank: int
    dp_rank: int
    sequence_parallel: bool  # effective: requested and tp > 1


def _check_megatron_collectives() -> None:
    """megatron-core's tensor-parallel collectives allocate with torch.cuda.current_device()."""
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as exc:
        raise UserError(
            f"parallel.tensor > 1 needs CUDA GPUs (megatron-core's tensor-parallel layers run on CUDA; here: {exc}). "
            "Set parallel.tensor=1 on this machine."
        ) from None


def init_model_parallel(tensor: int, sequence_parallel: bool, seed: int = 0) -> ParallelLayout:
    """Create the TP and DP groups over the already initialized default group (collective). Raises
    UserError when the world size is not a multiple of `tensor`."""
    import torch.distributed as dist

    parallel_state = _parallel_state()

    world = dist.get_world_size()
    if tensor < 1 or world % tensor:
        raise UserError(
            f"parallel.tensor={tensor} does not divide the world size {world} (processes started by torchrun/srun); "
            f"the data-parallel size is world / parallel.tensor. Use a parallel.tensor that divides {world}, "
            "or launch a multiple of it."
        )
    if tensor > 1:
        _check_megatron_collectives()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor)
    if tensor > 1 and torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        # megatron's RNG tracker: a TP-rank-specific CUDA generator (for dropout inside split
        # regions) and a shared one; the models have no dropout today, megatron's layers expect it.
        model_parallel_cuda_manual_seed(seed)
    return ParallelLayout(
        tp=tensor,
        dp=world // tensor,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        sequence_parallel=sequence_parallel and tensor > 1,
    )


def tensor_parallel_group():
    return _parallel_state().get_tensor_model_parallel_group()


class MegatronMPU:
    """DeepSpeed's `mpu` interface answered by megatron-core's parallel_state (no pipeline stages:
    the model-parallel group is the TP group)."""

    def __init__(self):
        self.ps = _parallel_state()

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
