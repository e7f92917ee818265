"""Sequence operators used by the models, with interchangeable implementations."""

from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS, feedback_solve

__all__ = ["feedback_solve", "FEEDBACK_SOLVE_IMPLS"]
