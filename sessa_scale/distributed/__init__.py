"""Process groups and collective helpers. Model code is written for one device; parallelism is
applied here and in the trainer."""

from sessa_scale.distributed.process_group import (
    all_reduce_mean,
    any_rank,
    barrier,
    device_for_rank,
    init_distributed,
    is_rank0,
    rank,
    world_size,
)

__all__ = ["all_reduce_mean", "any_rank", "barrier", "device_for_rank", "init_distributed", "is_rank0", "rank", "world_size"]
