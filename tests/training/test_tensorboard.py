"""`logging.tensorboard: true`: RUN_DIR/tensorboard/ holds every metrics.jsonl value as a scalar at its
step, across a resume too. Skipped without the `tensorboard` extra."""

import json

import pytest

pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install -e '.[tensorboard]'")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from sessa_scale.cli import main  # noqa: E402

RUN = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.corpus_bytes=200000",
    "train.micro_batch_size=2", "train.eval_interval=2", "train.eval_batches=1", "optim.warmup_steps=1",
    "optim.decay_steps=5", "logging.progress=false", "logging.tensorboard=true",
]  # fmt: skip


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", f"run.dir={run_dir}", *RUN, "train.max_steps=3"]) == 0
    assert main(["train", f"run.dir={run_dir}", *RUN, "train.max_steps=5"]) == 0  # resumes at step 3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    expected = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and value is not None:
                expected.setdefault(key, []).append((r["step"], value))
    assert set(events.Tags()["scalars"]) == set(expected) and {"loss", "val_loss", "lr", "grad_norm"} <= set(expected)
    for key, points in expected.items():
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [step for step, _ in logged] == [step for step, _ in points], key  # each step once, in order
        assert [v for _, v in logged] == pytest.approx([v for _, v in points], rel=1e-6), key  # float32 in the event file
    assert [s for s, _ in expected["val_loss"]] == [2, 3, 4, 5]  # every 2 steps and at the end of each run


def test_missing_tensorboard_package_is_a_user_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(["train", f"run.dir={tmp_path / 'r'}", *RUN, "train.max_steps=1"]) == 2
    assert 'needs the tensorboard package: pip install -e ".[tensorboard]"' in capsys.readouterr().err
