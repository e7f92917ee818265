"""Triton kernels of sessa_scale. ``kernels.feedback`` (leaves and the fused path) and
``kernels.feedback_gemm`` (the GEMM path's epilogues): the feedback solve, forward and backward;
its autograd op, paths and schedule live in ``sessa_scale/ops/feedback_*.py``, its plain
references in ``sessa_scale/ops/feedback_reference.py`` and ``feedback_chunked.py``."""
