"""One gradient buffer for a tensor split into column blocks, whose blocks' gradients are written
into it by their producers: the backward of a split then hands it on as is instead of
concatenating the blocks' gradients (autograd's SplitBackward: one more pass over the whole
gradient). The Mamba-2 mixer splits its fused input projection (B, T, 2E + 2GN + H) into z, the
conv input [x | B | C] and raw dt; the gated norm, the conv and the dt op (our Triton ops) write
dz, d[x | B | C] and d dt_raw into the slices (``sessa_scale/models/mamba2.py``).

Correct whatever arrives: when a block's gradient is not its slice (a PyTorch path produced it,
a hook replaced it, two uses of the block were added up out of place, it is None) the blocks are
concatenated as before. Each slice is handed out once per buffer (a second producer of the same
block gets a buffer of its own, which autograd adds), and the buffer is dropped when the split's
backward hands it on, so a graph kept for a second backward allocates a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sessa_scale.ops.work_buffers import new_buffer


class JointGradient:
    """The gradient (..., sum(widths)) of a tensor `like` split into column blocks of `widths`,
    allocated (uninitialized) by the first producer that takes a block's slice."""

    def __init__(self, like: torch.Tensor, widths: Sequence[int]):
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.widths = tuple(int(w) for w in widths)
        self.offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self.buffer: torch.Tensor | None = None
        self.taken: set[int] = set()

    def slot(self, block: int) -> GradientSlot:
        """The handle a producer of block's gradient keeps (in its autograd context)."""
        return GradientSlot(self, block)

    def _view(self, block: int) -> torch.Tensor:
        return self.buffer.narrow(-1, self.offsets[block], self.widths[block])

    def take(self, block: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """The slice of the buffer for block's gradient (shape (..., widths[block]), the buffer's
        dtype: ValueError otherwise), or a new buffer when that slice was taken already."""
        block_shape = self.shape[:-1] + (self.widths[block],)
        if torch.Size(shape) != block_shape or dtype != self.dtype:
            raise ValueError(f"block {block} of a joint gradient {tuple(self.shape)} {self.dtype} is "
                             f"{tuple(block_shape)} {self.dtype}; asked for {tuple(shape)} {dtype}")
        if self.buffer is None:
            self.buffer, self.taken = new_buffer(self.shape, self.dtype, self.device), set()
        if block in self.taken:
            return new_buffer(shape, dtype, self.device)
        self.taken.add(block)
        return self._view(block)

    def gather(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The gradient of the whole tensor from its blocks' gradients: the buffer when each block's
        gradient is its slice, else their concatenation (None as zeros). Drops the buffer."""
        buffer, complete = self.buffer, len(self.taken) == len(self.widths)
        self.buffer, self.taken = None, set()
        if buffer is not None and complete and all(_is_view(g, buffer, o, w) for g, o, w in
                                                   zip(grads, self.offsets, self.widths)):
            return buffer
        parts = [torch.zeros(self.shape[:-1] + (w,), dtype=self.dtype, device=self.device) if g is None else g
                 for g, w in zip(grads, self.widths)]
        return torch.cat(parts, dim=-1)


class GradientSlot:
    """Block `block` of a JointGradient: take(shape, dtype) -> the tensor to write its gradient into."""

    def __init__(self, joint: JointGradient, block: int):
        self.joint, self.block = joint, block

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return self.joint.take(self.block, shape, dtype)


def _is_view(grad: torch.Tensor | None, buffer: torch.Tensor, offset: int, width: int) -> bool:
    """Whether grad is buffer's columns [offset, offset + width) (same memory, shape and strides)."""
    if grad is None:
        return False
    view = buffer.narrow(-1, offset, width)
    return grad.data_ptr() == view.data_ptr() and grad.shape == view.shape and grad.stride() == view.stride()


class _SplitIntoJoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, joined, joint):
        ctx.joint = joint
        ctx.set_materialize_grads(False)
        return tuple(joined.split(joint.widths, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        return ctx.joint.gather(grads), None


def split_with_joint_gradient(joined: torch.Tensor, widths: Sequence[int]):
    """joined (..., sum(widths)) -> (its column blocks as views, JointGradient): as
    joined.split(widths, -1), except that the backward hands on the JointGradient's buffer
    (no concatenation) when each block's producer wrote its gradient into joint.slot(i)."""
    joint = JointGradient(joined, widths)
    return _SplitIntoJoint.apply(joined, joint), joint
