"""Worker for tests/distributed/test_tensor_parallel.py, run under torchrun with 2 processes (gloo): counts the
collectives of one forward + backward of tp=2 models with 1 and 2 blocks (torch.profiler's c10d
ops); rank 0 saves the difference, what one block communicates."""

import sys
from collections import Counter

import tests.distributed.cpu_collectives  # noqa: F401  (test-only CUDA->CPU mapping, see there)

import torch
import torch.distributed as dist

from sessa_scale.config.schema import ModelConfig
from sessa_scale.distributed.groups import init_model_parallel, tensor_parallel_group
from sessa_scale.distributed.tensor_parallel import parallelize
from sessa_scale.models.registry import build_model

CASES = {  # name -> (ModelConfig fields, sequence parallel)
    "sessa_fb1_sp": (dict(d_model=32, n_heads=2, vocab_size=258), True),
    "sessa_fb2_sp": (dict(d_model=32, n_heads=2, n_fb_heads=2, vocab_size=258), True),
    "sessa_fb1": (dict(d_model=32, n_heads=2, vocab_size=258), False),
    "transformer_sp": (dict(arch="transformer", d_model=32, n_heads=2, vocab_size=258), True),
}


def collectives(cfg: ModelConfig, group, sp: bool) -> Counter:
    """c10d op name -> calls in one forward + backward of the tp=2 model of `cfg` (T = 18)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    model = parallelize(build_model(cfg), group, sequence_parallel=sp)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("c10d::")})


def main(out: str) -> None:
    dist.init_process_group("gloo")
    layout = init_model_parallel(2, sequence_parallel=True)
    group = tensor_parallel_group()
    counts = {}
    for name, (fields, sp) in CASES.items():
        one, two = (collectives(ModelConfig(n_layers=n, **fields), group, sp) for n in (1, 2))
        counts[name] = dict(two - one)
    if layout.tp_rank == 0:
        torch.save(counts, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
