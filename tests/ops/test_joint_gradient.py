"""split_with_joint_gradient (sessa_scale/ops/joint_gradient.py): the joint buffer handed on without
a concatenation when every block's producer wrote its slot, and the same gradients as a plain
split whatever arrives instead (a PyTorch producer, a block used twice, an unused block, a graph
run backward twice)."""

from __future__ import annotations

import pytest
import torch

from sessa_scale.ops.joint_gradient import split_with_joint_gradient
from tests.helpers.op_counter import OpCounter

WIDTHS = (3, 5, 2)


class _ScaleIntoSlot(torch.autograd.Function):
    """x -> scale x, whose backward writes scale * grad into slot (a producer such as the mixer's conv)."""

    @staticmethod
    def forward(ctx, x, scale, slot):
        ctx.scale, ctx.slot, ctx.shape = scale, slot, x.shape
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        out = ctx.slot.take(ctx.shape, grad.dtype) if ctx.slot is not None else torch.empty_like(grad)
        return torch.mul(grad, ctx.scale, out=out), None, None


def _joined(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 7, sum(WIDTHS), generator=gen, dtype=torch.float64, requires_grad=True)


def _grad(joined, make_loss, use_joint: bool):
    """d loss / d joined, loss = make_loss(blocks, slots) over joined's blocks (joint or plain split)."""
    if use_joint:
        blocks, joint = split_with_joint_gradient(joined, WIDTHS)
        slots = [joint.slot(i) for i in range(len(WIDTHS))]
    else:
        blocks, slots = joined.split(WIDTHS, dim=-1), [None] * len(WIDTHS)
    counter = OpCounter()
    loss = make_loss(blocks, slots)
    with counter:
        (grad,) = torch.autograd.grad(loss, [joined])
    return grad, counter.ops["cat"]


def _all_into_slots(blocks, slots):
    return sum(((i + 2.0) * _ScaleIntoSlot.apply(b, i + 2.0, s)).sum() for i, (b, s) in enumerate(zip(blocks, slots)))


def test_all_blocks_into_their_slots_hand_on_the_buffer_without_a_concatenation():
    joined = _joined()
    grad, cats = _grad(joined, _all_into_slots, use_joint=True)
    want, plain_cats = _grad(joined, _all_into_slots, use_joint=False)
    assert cats == 0 and plain_cats == 1  # the plain split concatenates the blocks' gradients
    expected = torch.cat([torch.full((2, 7, w), (i + 2.0) ** 2, dtype=torch.float64) for i, w in enumerate(WIDTHS)], -1)
    assert torch.equal(grad, expected) and torch.equal(want, expected)


@pytest.mark.parametrize("case", ["torch producer", "block used twice", "unused block", "hook"])
def test_other_gradients_fall_back_to_the_plain_splits_values(case):
    def make_loss(blocks, slots):
        loss = _ScaleIntoSlot.apply(blocks[0], 2.0, slots[0]).sum() + (3.0 * blocks[1]).pow(2).sum()
        if case != "unused block":
            loss = loss + _ScaleIntoSlot.apply(blocks[2], 5.0, slots[2]).sum()
        if case == "block used twice":  # both producers of block 0 take its slot: the second gets its own buffer
            loss = loss + (_ScaleIntoSlot.apply(blocks[0], 7.0, slots[0]) ** 2).sum()
        if case == "hook":
            blocks[2].register_hook(lambda g: g * 11.0)
        return loss

    joined = _joined(1)
    grad, cats = _grad(joined, make_loss, use_joint=True)
    want, _ = _grad(joined, make_loss, use_joint=False)
    assert cats == 1 and torch.allclose(grad, want, rtol=1e-15, atol=0), case


def test_a_graph_run_backward_twice_gives_the_same_gradients():
    joined = _joined(2)
    blocks, joint = split_with_joint_gradient(joined, WIDTHS)
    loss = _all_into_slots(blocks, [joint.slot(i) for i in range(len(WIDTHS))])
    first = torch.autograd.grad(loss, [joined], retain_graph=True)[0].clone()
    assert joint.buffer is None  # handed on, not kept by the graph
    second = torch.autograd.grad(loss, [joined])[0]
    assert torch.equal(first, second)


def test_a_slot_refuses_another_shape_or_dtype():
    blocks, joint = split_with_joint_gradient(_joined().detach(), WIDTHS)
    with pytest.raises(ValueError, match=r"block 1 of a joint gradient \(2, 7, 10\)"):
        joint.slot(1).take((2, 7, 4), torch.float64)
    with pytest.raises(ValueError, match="asked for"):
        joint.slot(1).take((2, 7, 5), torch.float32)
