"""The dataset format, the writer, and the resumable blended loader: packing against an
independent reading of the shards (tarfile / webdataset), partitioning across ranks and
DataLoader workers, blend ratios, exact resume, and integrity errors."""

import tarfile
import time

import numpy as np
import pytest
import torch

from sessa_scale.config import load_config
from sessa_scale.data import ByteTokenizer, ShardStream, StreamSpec, write_dataset
from sessa_scale.data.corpus import prepare_stdlib, stdlib_documents
from sessa_scale.data.loader import SampleSequence, eval_batches, inputs_and_targets
from sessa_scale.data.reader import open_split
from sessa_scale.data.setup import build_training_data
from sessa_scale.errors import UserError
from tests.helpers.shards import tar_samples


def _docs(n, seed=0, lo=1, hi=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _dataset(path, n_docs=40, seq_len=16, seed=0, val_fraction=0.0, shard_bytes=8192):
    write_dataset(_docs(n_docs, seed), path, seq_len=seq_len, val_fraction=val_fraction, seed=seed, shard_bytes=shard_bytes)
    return str(path)


def _spec(paths, weights=None, seed=5, shuffle_buffer=7, split="train"):
    return StreamSpec([open_split(p, split) for p in paths], weights or [1.0] * len(paths), seed, shuffle_buffer)


@pytest.mark.parametrize("seq_len", [1, 17, 63, 65, 130])
def test_packing_matches_the_concatenated_documents(tmp_path, seq_len):
    docs = _docs(30, seed=seq_len, hi=150)
    manifest = write_dataset(docs, tmp_path / "ds", seq_len=seq_len, val_fraction=0.3, seed=1, shard_bytes=4096)
    from sessa_scale.data.dataset import is_validation

    for split in ("train", "val"):
        stream = np.concatenate([d + [256] for i, d in enumerate(docs) if (split == "val") == is_validation(1, i, 0.3)])
        samples = tar_samples(tmp_path / "ds", split)
        n = (len(stream) - 1) // seq_len
        assert sorted(samples) == list(range(n)) and manifest["splits"][split]["samples"] == n
        for i in range(n):
            assert samples[i].tolist() == stream[i * seq_len : i * seq_len + seq_len + 1].tolist()
        assert manifest["splits"][split]["tokens"] == len(stream)
    assert len(manifest["splits"]["train"]["shards"]) > 1


def test_shards_are_byte_identical_for_the_same_input_and_seed(tmp_path):
    a = write_dataset(_docs(50), tmp_path / "a", seq_len=9, val_fraction=0.2, seed=3, shard_bytes=4096)
    b = write_dataset(_docs(50), tmp_path / "b", seq_len=9, val_fraction=0.2, seed=3, shard_bytes=4096)
    c = write_dataset(_docs(50), tmp_path / "c", seq_len=9, val_fraction=0.2, seed=4, shard_bytes=4096)
    files = [s["file"] for split in ("train", "val") for s in a["splits"][split]["shards"]]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a == b and a["splits"] != c["splits"]  # the seed picks the validation documents
    with tarfile.open(tmp_path / "a" / files[0]) as tf:
        m = tf.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    path = _dataset(tmp_path / "ds")
    expected = tar_samples(path, "train")
    urls = [f"{path}/{s['file']}" for s in open_split(path, "train").shards]
    got = {int(s["__key__"]): s["npy"].astype(np.int64) for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)


def test_stream_delivers_the_stored_samples_as_shifted_targets(tmp_path):
    path = _dataset(tmp_path / "ds")
    stored = tar_samples(path, "train")
    stream = ShardStream(_spec([path]), micro_batch_size=3)
    for _ in range(5):
        (x, y), ids = inputs_and_targets(stream.next_step()[0]), stream.last_ids[0]
        assert x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
        for row, (_, key) in enumerate(ids.tolist()):
            assert x[row].tolist() + [int(y[row, -1])] == stored[key].tolist()


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=80)
    n = open_split(path, "train").num_samples
    ranks = [ShardStream(_spec([path]), 2, 1, r, 2, num_workers=2, prefetch=2) for r in range(2)]
    serial = ShardStream(_spec([path]), 4)  # one rank, no workers, the same global batch
    seen, steps = [], -(-n // 4)
    for _ in range(steps):
        step_ids = []
        for stream in ranks:
            stream.next_step()
            step_ids += [key for _, key in stream.last_ids[0].tolist()]
        serial.next_step()
        assert step_ids == [key for _, key in serial.last_ids[0].tolist()]
        seen += step_ids
    assert sorted(seen[:n]) == list(range(n))  # the first epoch: every sample exactly once
    assert len(set(seen[n:])) == len(seen[n:])  # the next epoch starts without repeats
    assert seen[:n] != sorted(seen[:n])  # shuffled
    for stream in ranks:
        stream.close()


def test_epochs_are_reshuffled_and_shard_order_changes(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=80)
    seq = SampleSequence(_spec([path], shuffle_buffer=1))
    n = open_split(path, "train").num_samples
    epoch0 = [seq.sample_id(p)[1] for p in range(n)]
    epoch1 = [seq.sample_id(p)[1] for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    where = {key: p for p, key in enumerate(epoch0)}  # window 1: whole shards, each in order
    start = 0
    for shard in open_split(path, "train").shards:
        p0 = where[start]
        assert [where[k] for k in range(start, start + shard["samples"])] == list(range(p0, p0 + shard["samples"]))
        start += shard["samples"]
    assert epoch0 != list(range(n))


def test_blend_ratios_are_within_two_percent_over_10k_samples(tmp_path):
    paths = [_dataset(tmp_path / f"s{i}", n_docs=20 + 30 * i, seed=i) for i in range(3)]
    weights = [5.0, 3.0, 2.0]
    seq = SampleSequence(_spec(paths, weights))
    sources = np.array([seq.sample_id(p)[0] for p in range(10_000)])
    fractions = np.bincount(sources, minlength=3) / 10_000
    assert np.all(np.abs(fractions - np.array(weights) / 10) < 0.02), fractions
    first = np.bincount(sources[:100], minlength=3) / 100
    assert np.all(np.abs(first - np.array(weights) / 10) < 0.05)  # also mixed at small scale
    for s, path in enumerate(paths):  # each source still walks through its epochs without repeats
        keys = [seq.sample_id(p)[1] for p in range(10_000) if sources[p] == s]
        n = open_split(path, "train").num_samples
        assert sorted(keys[:n]) == list(range(n))
    stream = ShardStream(_spec(paths, weights), micro_batch_size=8)
    stream.next_step()
    assert [tuple(r) for r in stream.last_ids[0].tolist()] == [seq.sample_id(p) for p in range(8)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_sees_exactly_the_uninterrupted_samples(tmp_path, workers):
    paths = [_dataset(tmp_path / "a", n_docs=60), _dataset(tmp_path / "b", n_docs=30, seed=1)]

    def stream():
        return ShardStream(_spec(paths, [2.0, 1.0]), 3, 2, num_workers=workers, prefetch=3)

    straight = stream()
    expected = []
    for _ in range(12):
        straight.next_step()
        expected.append([t.tolist() for t in straight.last_ids])
    first = stream()
    got = []
    for _ in range(5):
        first.next_step()
        got.append([t.tolist() for t in first.last_ids])
    state = first.state_dict()
    first.close()
    resumed = stream()
    resumed.load_state_dict(state)
    for _ in range(7):
        resumed.next_step()
        got.append([t.tolist() for t in resumed.last_ids])
    assert got == expected
    for s in (straight, resumed):
        s.close()


def test_resume_with_another_dp_size_keeps_the_global_sample_sequence(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=60)

    def step_ids(streams):
        out = []
        for s in streams:
            s.next_step()
            out += [key for ids in s.last_ids for _, key in ids.tolist()]
        return out

    straight = [ShardStream(_spec([path]), 2, 1, r, 2) for r in range(2)]  # 2 ranks x 2 = global batch 4
    expected = [step_ids(straight) for _ in range(9)]
    two = [ShardStream(_spec([path]), 2, 1, r, 2) for r in range(2)]
    got = [step_ids(two) for _ in range(4)]
    assert two[0].state_dict() == two[1].state_dict()  # the state does not depend on the rank
    one = ShardStream(_spec([path]), 2, 2, 0, 1)  # 1 rank x 2 accumulation steps: same global batch
    one.load_state_dict(two[0].state_dict())
    got += [step_ids([one]) for _ in range(3)]
    assert got == expected[:7]
    four = [ShardStream(_spec([path]), 1, 1, r, 4) for r in range(4)]
    for s in four:
        s.load_state_dict(one.state_dict())
    assert step_ids(four) + step_ids(four) == expected[7] + expected[8]


def test_resume_refuses_other_data_or_seed(tmp_path):
    paths = [_dataset(tmp_path / "a"), _dataset(tmp_path / "b", seed=1)]
    state = ShardStream(_spec(paths[:1]), 2).state_dict()
    for spec in (_spec(paths[1:]), _spec(paths[:1], seed=6), _spec(paths, [1.0, 1.0])):
        with pytest.raises(UserError, match="data position"):
            ShardStream(spec, 2).load_state_dict(state)


def test_eval_batches_are_fixed_and_rank_disjoint(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=60, val_fraction=0.5)
    spec = StreamSpec([open_split(path, "val")], [1.0], shuffle=False)
    r0, r1 = (eval_batches(spec, 2, 2, r, 2) for r in range(2))
    assert torch.equal(r0[0][0], eval_batches(spec, 2, 2, 0, 2)[0][0])
    stored = tar_samples(path, "val")
    rows = [x[i].tolist() + [int(y[i, -1])] for b in (r0, r1) for x, y in b for i in range(2)]
    assert sorted(rows) == sorted(stored[k].tolist() for k in range(8))


def test_stdlib_corpus_is_prepared_once_through_the_same_format(tmp_path):
    cfg = load_config(None, ["data.corpus_bytes=60000", "data.seq_len=33", f"data.cache_dir={tmp_path}"]).data
    path = prepare_stdlib(cfg)
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert prepare_stdlib(cfg) == path and (path / "manifest.json").stat().st_mtime_ns == mtime
    docs = stdlib_documents(60000)
    train, val = tar_samples(path, "train"), tar_samples(path, "val")
    manifest = open_split(str(path), "train").manifest
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(docs)
    assert manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"] == 60000 + len(docs)
    first = np.frombuffer(docs[0], dtype=np.uint8)[:34]  # document 0 is held out
    assert val[0][: len(first)].tolist() == first.tolist() and len(train) > len(val) >= 1
    assert ByteTokenizer().decode(train[0].tolist())


def test_bad_sources_are_reported_together(tmp_path):
    from sessa_scale.data.dataset import DatasetWriter

    a = _dataset(tmp_path / "a", seq_len=16, val_fraction=0.3)
    big = DatasetWriter(tmp_path / "big", {"kind": "hf", "name": "big", "vocab_size": 70000, "eos_id": 0}, 16)
    big.add(list(range(60000, 60100)))
    big.close()
    cfg = load_config(None, [f"data.sources=[{{path: {a}, weight: 1}}, {{path: {tmp_path / 'big'}, weight: 1}}]", "data.seq_len=8"])
    with pytest.raises(UserError) as err:
        build_training_data(cfg, 0, 1)
    text = str(err.value)
    for needle in ("--seq-len 16", "model.vocab_size >= 70000", "share one tokenizer"):
        assert needle in text
    cfg = load_config(None, [f"data.path={tmp_path / 'missing'}"])
    with pytest.raises(UserError, match="does not exist"):
        build_training_data(cfg, 0, 1)


def _corrupt(path, shard, offset, data):
    with open(f"{path}/{shard}", "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_missing_truncated_and_corrupt_shards_are_user_errors(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=60)
    shards = [s["file"] for s in open_split(path, "train").shards]
    stride = open_split(path, "train").layout.stride

    def read_all(verify=True):
        spec = _spec([path])
        spec.verify = verify
        seq = SampleSequence(spec)
        seq.read(0, spec.splits[0].num_samples)

    read_all()
    raw = (tmp_path / "ds" / shards[1]).read_bytes()
    _corrupt(path, shards[1], stride + 650, b"\x07")  # the low byte of token 5 of sample 1
    with pytest.raises(UserError, match="sha256"):
        read_all()
    read_all(verify=False)  # undetectable without the checksum, as documented
    _corrupt(path, shards[1], stride + 3, b"X")  # the tar header of sample 1
    with pytest.raises(UserError, match="is not 0000000"):
        read_all(verify=False)
    data = stride + 512 + 128  # token 0 of sample 1 -> 0xff00 >= vocab
    (tmp_path / "ds" / shards[1]).write_bytes(raw[:data] + b"\x00\xff" + raw[data + 2 :])
    with pytest.raises(UserError, match="token id"):
        read_all(verify=False)
    (tmp_path / "ds" / shards[1]).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="truncated"):
        read_all(verify=False)
    (tmp_path / "ds" / shards[1]).unlink()
    with pytest.raises(UserError, match=f"missing: {shards[1]}"):
        _spec([path])


def test_worker_errors_reach_the_user_as_one_message(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=60)
    stream = ShardStream(_spec([path]), 4, num_workers=1)
    shard = open_split(path, "train").shards[0]["file"]
    _corrupt(path, shard, 0, b"Z")
    with pytest.raises(UserError, match="corrupt"):
        for _ in range(40):
            stream.next_step()


def test_writer_refuses_out_of_range_tokens_and_existing_output(tmp_path):
    with pytest.raises(UserError, match=r"\[0, 257\)"):
        write_dataset([[1, 2, 300]], tmp_path / "x", seq_len=2)
    _dataset(tmp_path / "ds")
    with pytest.raises(UserError, match="--overwrite"):
        _dataset(tmp_path / "ds")
    with pytest.raises(UserError, match="not one sample"):
        write_dataset([[1, 2]], tmp_path / "tiny", seq_len=8)
    assert not (tmp_path / "tiny").exists()


def test_data_config_problems_are_reported_together():
    from sessa_scale.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=a", "data.sources=[{path: b, weight: -1}, {weight: 2, extra: 1}, 3]", "data.num_workers=-1"])
    text = str(err.value)
    for needle in (
        "data.sources: cannot be set together with data.path",
        "data.sources[0]: weight must be a number > 0",
        "data.sources[1]: unknown key(s) extra",
        "data.sources[1]: needs path",
        "data.sources[2]: must be a mapping",
        "data.num_workers: must be >= 0",
    ):
        assert needle in text, needle
    cfg = load_config(None, ["data.sources=[{path: a, weight: 3}, {path: b}]"])
    assert cfg.data.sources == [{"path": "a", "weight": 3}, {"path": "b"}]


def test_pipe_locations_stream_like_local_ones(tmp_path):
    path = _dataset(tmp_path / "ds", n_docs=60)
    remote = f"pipe:cat {path}/{{}}"
    local = ShardStream(_spec([path]), 4)
    piped = ShardStream(StreamSpec([open_split(remote, "train")], [1.0], 5, 7), 4)
    for _ in range(8):
        a, b = local.next_step()[0], piped.next_step()[0]
        assert torch.equal(a, b) and torch.equal(local.last_ids[0], piped.last_ids[0])
    shard = open_split(path, "train").shards[0]["file"]
    _corrupt(path, shard, 700, b"\x01")
    with pytest.raises(UserError, match="sha256"):
        SampleSequence(StreamSpec([open_split(remote, "train")], [1.0], 5, 7, shuffle=False)).read(0, 1)


def test_load_corpus_rejoins_the_validation_documents(tmp_path):
    from sessa_scale.data import load_corpus
    from sessa_scale.data.dataset import is_validation

    docs = _docs(40, seed=2, hi=90)
    write_dataset(docs, tmp_path / "ds", seq_len=11, val_fraction=0.3, seed=4)
    corpus = load_corpus(load_config(None, [f"data.path={tmp_path / 'ds'}", "data.seq_len=11"]).data)
    stream = [t for i, d in enumerate(docs) if is_validation(4, i, 0.3) for t in d + [256]]
    n = (len(stream) - 1) // 11
    assert corpus.val.tolist() == stream[: n * 11 + 1] and corpus.eos_id == 256 and corpus.vocab_size == 257


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_micro_batch_copy_leaves_the_host_free(tmp_path, workers):
    """The trainer's copy of a micro-batch (trainer.device_batch of next_step's pinned block, 32 x 2049
    tokens: 525 KB) returns while the GPU is still busy. The trainer's old copy of the non-contiguous
    views is timed beside it and printed; a 2 KB copy of a view did not wait in the H200 run, hence the
    trainer's size."""
    from sessa_scale.training.trainer import device_batch

    path = _dataset(tmp_path / "ds", n_docs=3000, seq_len=2048)
    stream = ShardStream(_spec([path]), micro_batch_size=32, num_workers=workers, pin_memory=True)
    block = stream.next_step()[0]
    stream.close()
    assert block.shape == (32, 2049) and block.is_contiguous() and block.is_pinned()
    cuda = torch.device("cuda")
    copies = {"device_batch": lambda: device_batch(block, cuda),
              "old: views": lambda: [t.to(cuda, non_blocking=True) for t in inputs_and_targets(block)]}
    for copy in copies.values():  # first calls load kernels (lazily, with a device synchronization)
        copy()
    torch.cuda.synchronize()

    def host_ms(copy) -> float:
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU work queued ahead of the copy
        start = time.perf_counter()
        copy()
        elapsed = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        return elapsed

    ms = {name: host_ms(copy) for name, copy in copies.items()}
    print(f"host ms behind 0.1 s of queued GPU work (workers={workers}): {ms}")
    assert ms["device_batch"] < 20
