"""zero.overlap_comm / reduce_bucket_size / allgather_bucket_size / contiguous_gradients reach
DeepSpeed's ZeRO config as DeepSpeed parses it. (That ZeRO-1's reductions then run inside the
backward pass is checked on a real dp=2 run in tests/bench/test_bench_parallel.py.)"""

import pytest
import torch
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

from sessa_scale.config import ConfigError, load_config
from sessa_scale.training.trainer import deepspeed_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_defaults_overlap_the_reduction_in_50m_element_buckets(stage):
    zero = DeepSpeedZeroConfig(**deepspeed_config(load_config(None, [f"zero.stage={stage}"]), 2, CPU)["zero_optimization"])
    # DeepSpeed's own defaults: overlap only at stage 3, 500M-element buckets (a 350M model in one bucket)
    assert (zero.stage, zero.overlap_comm, zero.contiguous_gradients) == (stage, True, True)
    assert zero.reduce_bucket_size == zero.allgather_bucket_size == zero.prefetch_bucket_size == 50_000_000


def test_overrides_reach_deepspeed_and_stage_3_prefetches_in_allgather_buckets():
    overrides = ["zero.stage=3", "zero.overlap_comm=false", "zero.reduce_bucket_size=1234", "zero.allgather_bucket_size=4321",
                 "zero.contiguous_gradients=false"]  # fmt: skip
    zero = DeepSpeedZeroConfig(**deepspeed_config(load_config(None, overrides), 2, CPU)["zero_optimization"])
    assert (zero.overlap_comm, zero.contiguous_gradients, zero.reduce_bucket_size) == (False, False, 1234)
    assert zero.prefetch_bucket_size == 4321


def test_bucket_sizes_must_be_positive():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["zero.reduce_bucket_size=0", "zero.allgather_bucket_size=-1"])
    text = str(info.value)
    assert "zero.reduce_bucket_size: must be >= 1" in text and "zero.allgather_bucket_size: must be >= 1" in text
