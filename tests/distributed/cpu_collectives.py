"""TEST-ONLY shim: megatron-core's tensor- and sequence-parallel collectives allocate their output
buffers with `torch.cuda.current_device()`, which fails on a CPU-only build. Multi-process CPU tests
(gloo) import this first to map that one call to the CPU device; nothing else is changed, and the
production path (NCCL on GPUs) never imports it."""

import torch

torch.cuda.current_device = lambda: torch.device("cpu")
