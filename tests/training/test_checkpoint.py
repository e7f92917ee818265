"""Checkpoint manager: atomic `latest`, keep-K, resume resolution, unreadable checkpoints."""

import shutil

import pytest
import torch

from sessa_scale.checkpoint import CheckpointManager, find_checkpoint, read_meta
from sessa_scale.errors import UserError


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


def _three_checkpoints(tmp_path, keep: int) -> CheckpointManager:
    """A manager under tmp_path that saved steps 1, 2, 3 of a training engine."""
    manager = CheckpointManager(tmp_path, keep=keep)
    engine = _engine(0)
    for step in (1, 2, 3):
        _train_step(engine, step)
        manager.save(engine, step, {"step": step}, {})
    return manager


def test_keep_k_and_latest_pointer(tmp_path):
    manager = _three_checkpoints(tmp_path, keep=2)
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


def _config(run_dir, resume: str):
    from sessa_scale.config import Config

    cfg = Config()
    cfg.run.dir, cfg.train.resume = str(run_dir), resume
    return cfg


def _meta(run_dir) -> dict:
    from sessa_scale.config import config_to_dict

    return {"config": config_to_dict(_config(run_dir, "auto")), "parallel": {"tensor": 1, "data": 1}}


def test_resume_resolution(tmp_path):
    from sessa_scale.training.resume import plan_resume

    run = tmp_path / "run"
    manager = CheckpointManager(run, keep=2)
    assert plan_resume(_config(run, "auto"), 1) is None and plan_resume(_config(run, "none"), 1) is None
    with pytest.raises(UserError, match="does not exist"):
        plan_resume(_config(run, str(tmp_path / "nowhere")), 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a checkpoint"):
        plan_resume(_config(run, str(tmp_path / "empty")), 1)
    manager.save(_engine(0), 4, {"step": 4}, _meta(run))
    assert plan_resume(_config(run, "auto"), 1).name == "step_00000004"
    assert plan_resume(_config(run, str(run)), 1).name == "step_00000004"
    with pytest.raises(UserError, match="train.resume=auto"):
        plan_resume(_config(run, "none"), 1)
    other = tmp_path / "other"  # a run directory holding a run of its own
    shutil.copytree(run, other)
    with pytest.raises(UserError, match="continues another run's checkpoint"):
        plan_resume(_config(other, str(run)), 1)


def test_a_missing_or_unusable_latest_stands_for_the_newest_complete_checkpoint(tmp_path, capsys):
    """`latest` deleted, holding garbage, or naming a truncated checkpoint: the newest complete
    checkpoint is found by scanning, and the reason is said (never a silent fresh start)."""
    manager = _three_checkpoints(tmp_path, keep=5)
    pointer = manager.dir / "latest"
    pointer.unlink()
    assert manager.latest().name == "step_00000003"
    assert find_checkpoint(tmp_path).name == "step_00000003"
    assert "latest is missing; using the newest complete checkpoint found by scanning, step_00000003" in capsys.readouterr().err

    for garbage, said in ((b"\x00\xffgarbage", "latest is unreadable"), (b"step_0003?", "not a checkpoint name")):
        pointer.write_bytes(garbage)
        assert find_checkpoint(tmp_path).name == "step_00000003" and said in capsys.readouterr().err

    pointer.write_text("step_00000003\n")
    weights = manager.dir / "step_00000003" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated file, as a full disk or a copy cut short leaves
    assert find_checkpoint(tmp_path).name == "step_00000002"
    err = capsys.readouterr().err
    assert "names step_00000003, which is incomplete (mp_rank_00_model_states.pt has 1,000 bytes" in err
    assert "using the newest complete checkpoint found by scanning, step_00000002" in err
    assert err.count("1,000 bytes") == 1  # the truncated checkpoint is described once
    client = manager.load(_engine(7), manager.latest())
    assert client["step"] == 2

    for step in (1, 2):
        (manager.dir / f"step_{step:08d}" / "meta.json").unlink()
    with pytest.raises(UserError, match="no complete checkpoint was found"):
        find_checkpoint(tmp_path)


def test_a_save_refused_by_the_file_system_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk during a save (torch.save's OSError injected on the second save): a UserError
    naming the checkpoint and the cause, the partial checkpoint removed, `latest` unchanged."""
    import errno

    manager = CheckpointManager(tmp_path, keep=3)
    engine = _engine(0)
    manager.save(engine, 1, {"step": 1}, {})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as caught:
        manager.save(engine, 2, {"step": 2}, {})
    message = str(caught.value)
    assert "step_00000002" in message and "no space left on the device (ENOSPC)" in message
    assert "step_00000001 is intact" in message
    assert sorted(p.name for p in manager.dir.iterdir()) == ["latest", "step_00000001"]
    monkeypatch.undo()
    assert manager.load(_engine(3), manager.latest())["step"] == 1


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    path = manager.save(_engine(0), 1, {"step": 1}, {})
    (path / "mp_rank_00_model_states.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="could not be loaded"):
        manager.load(_engine(1), path)
