"""The trainer turns DeepSpeed's gradient all-reduce off where it is the identity (one data-parallel
rank, ZeRO stage 0): no flatten-and-copy-back of every gradient after the backward pass."""

import torch

from tests.helpers.op_counter import OpCounter


def _backward_ops_and_grads(skip: bool):
    import deepspeed

    from sessa_scale.distributed import init_distributed
    from sessa_scale.training.trainer import skip_identity_allreduce

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 1 << 30,
              "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    if skip:
        skip_identity_allreduce(engine, zero_stage=0, dp_size=1)
    loss = engine(torch.randn(2, 6, generator=torch.Generator().manual_seed(1))).pow(2).mean()
    with OpCounter() as counter:
        engine.backward(loss)
    return counter.ops, [p.grad.clone() for p in model.parameters()]


def test_one_rank_stage_0_backward_copies_no_gradient_and_keeps_them():
    ops, grads = _backward_ops_and_grads(skip=True)
    ref_ops, ref_grads = _backward_ops_and_grads(skip=False)
    assert ref_ops["copy_"] == 4 and ref_ops["cat"] == 1, ref_ops  # DeepSpeed's: one copy per parameter
    assert ops["copy_"] == 0 and ops["cat"] == 0 and ops["allreduce_"] == 0, ops
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)
