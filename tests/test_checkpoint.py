"""Checkpoint manager: atomic `latest`, keep-K, resume resolution, unreadable checkpoints."""

import os

import pytest
import torch

from sessa_scale.checkpoint import CheckpointManager, find_checkpoint, read_meta
from sessa_scale.errors import UserError

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _engine(seed: int):
    import deepspeed

    from sessa_scale.distributed import init_distributed

    init_distributed()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _train_step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = engine(torch.randn(2, 6, generator=g)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _params(engine):
    return [p.detach().clone() for p in engine.module.parameters()]


def test_save_load_round_trip_restores_weights_optimizer_and_client_state(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    engine = _engine(0)
    _train_step(engine, 1)
    manager.save(engine, 1, {"step": 1, "data": {"offset": 7}}, {"config": {"model": {}}})
    _train_step(engine, 2)
    expected_after = _params(engine)

    fresh = _engine(99)
    client = manager.load(fresh, manager.latest())
    assert client["data"] == {"offset": 7} and read_meta(manager.latest())["step"] == 1
    _train_step(fresh, 2)  # same step from the restored optimizer state gives the same weights
    for a, b in zip(_params(fresh), expected_after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_keep_k_and_latest_pointer(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    engine = _engine(0)
    for step in (1, 2, 3):
        _train_step(engine, step)
        manager.save(engine, step, {"step": step}, {})
    kept = sorted(p.name for p in manager.dir.iterdir() if p.is_dir())
    assert kept == ["step_00000002", "step_00000003"]
    assert manager.latest().name == "step_00000003"
    assert find_checkpoint(tmp_path) == manager.latest()


def test_interrupted_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    engine = _engine(0)
    manager.save(engine, 1, {"step": 1}, {})
    debris = manager.dir / "step_00000002.partial"  # what a kill during the next save leaves
    debris.mkdir()
    (debris / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    assert manager.latest().name == "step_00000001"
    client = manager.load(_engine(5), manager.latest())
    assert client["step"] == 1
    manager.save(engine, 2, {"step": 2}, {})  # the next save clears the debris
    assert not debris.exists() and manager.latest().name == "step_00000002"


def test_resume_resolution(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep=2)
    assert manager.resolve_resume("auto") is None and manager.resolve_resume("none") is None
    with pytest.raises(UserError, match="does not exist"):
        manager.resolve_resume(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a checkpoint"):
        manager.resolve_resume(str(tmp_path / "empty"))
    manager.save(_engine(0), 4, {"step": 4}, {})
    assert manager.resolve_resume("auto").name == "step_00000004"
    assert manager.resolve_resume(str(tmp_path / "run")).name == "step_00000004"
    with pytest.raises(UserError, match="train.resume=auto"):
        manager.resolve_resume("none")
    (manager.dir / "latest").write_text("step_00000009\n")
    with pytest.raises(UserError, match="missing or incomplete"):
        manager.resolve_resume("auto")


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    path = manager.save(_engine(0), 1, {"step": 1}, {})
    (path / "mp_rank_00_model_states.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="could not be loaded"):
        manager.load(_engine(1), path)
