"""Tensor and sequence parallelism and multi-process training on CPU (gloo): the test_*.py modules, and the
worker scripts they run under torchrun (tests.helpers.torchrun): tp_equivalence.py, tp_collectives.py,
train.py, with cpu_collectives.py (the test-only CUDA->CPU mapping the workers import first)."""
