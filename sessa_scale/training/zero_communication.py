"""Data-parallel communication settings of DeepSpeed's ZeRO optimizers, from the `zero` config section.

With zero.overlap_comm (default) the gradients of stages 1-3 are reduced over the data-parallel ranks
in buckets of zero.reduce_bucket_size elements while the backward pass is still running: a bucket is
reduced on a side stream as soon as its gradients are ready, so by the end of the backward pass only
the last bucket is outstanding (stage 1 does this on the last micro-batch of an accumulation cycle,
stages 2-3 on every micro-batch). Without it, stages 1-2 reduce everything after the backward pass.

The 50M-element default buckets (Megatron's data-parallel default is 40M) split a 350M-parameter
model into ~7 reductions, so all but the last overlap with the backward pass, at ~400 MB of bucket
memory for fp32 gradients (DeepSpeed double-buffers a bucket under overlap_comm). DeepSpeed's own
default (500M) holds a whole 350M model in one bucket, which cannot start before the backward pass ends.
"""

from __future__ import annotations

from sessa_scale.config import Config


def zero_communication_config(cfg: Config) -> dict:
    """Keys for DeepSpeed's "zero_optimization" section: overlap and bucket sizes (elements)."""
    zero = cfg.zero
    keys = {
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": zero.contiguous_gradients,
        "reduce_bucket_size": zero.reduce_bucket_size,
        "allgather_bucket_size": zero.allgather_bucket_size,
    }
    if zero.stage == 3:  # ZeRO-3 gathers parameters ahead of use instead of after the step
        keys["stage3_prefetch_bucket_size"] = zero.allgather_bucket_size
    return keys
