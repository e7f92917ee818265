"""Triton kernels of sessa_scale. ``kernels.feedback``: the feedback solve (forward/backward);
its autograd wrapper and schedule live in ``sessa_scale/ops/feedback_triton.py``, its plain
references in ``sessa_scale/ops/feedback_reference.py`` and ``feedback_chunked.py``."""
