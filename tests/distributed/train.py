"""Worker for multi-process training tests: `sessa-scale train ARGS...` under torchrun on CPU
(gloo), with the test-only CUDA->CPU mapping of megatron-core's collective buffers."""

import sys

import tests.distributed.cpu_collectives  # noqa: F401  (test-only, see there)

from sessa_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
