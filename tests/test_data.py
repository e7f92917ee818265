"""The embedded corpus and the resumable batch stream."""

import pytest
import torch

from sessa_scale.config import DataConfig
from sessa_scale.data import BatchStream, ByteTokenizer, load_corpus
from sessa_scale.data.loader import eval_batches
from sessa_scale.errors import UserError


def _stream(tokens, **kw):
    args = dict(seq_len=8, micro_batch_size=2, grad_accum_steps=1, dp_rank=0, dp_size=1, seed=3)
    args.update(kw)
    return BatchStream(tokens, **args)


def test_byte_tokenizer_round_trip_and_eos():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo'\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id] + tok.encode("junk")) == text


def test_stdlib_corpus_is_deterministic_and_split_by_document():
    cfg = DataConfig(corpus_bytes=300_000, val_fraction=0.1)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    n_docs = int((a.train == a.eos_id).sum()) + int((a.val == a.eos_id).sum())
    assert a.train.numel() + a.val.numel() == 300_000 + n_docs  # every byte plus one EOS per document
    assert 0.1 <= a.val.numel() / (a.train.numel() + a.val.numel()) < 0.5
    assert int((a.train == a.eos_id).sum()) >= 1 and int((a.val == a.eos_id).sum()) >= 1
    assert int(a.train.max()) <= 256 and int(a.train.min()) >= 0


def test_sequences_are_shifted_targets():
    tokens = torch.arange(200)
    x, y = _stream(tokens).next_step()[0]
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])


def test_epoch_visits_every_sequence_once_then_reshuffles():
    tokens = torch.arange(8 * 12 + 1)  # 12 sequences, global batch 4 -> 3 steps per epoch
    s = _stream(tokens, micro_batch_size=4)
    epoch0 = torch.cat([s.next_indices()[0] for _ in range(3)])
    epoch1 = torch.cat([s.next_indices()[0] for _ in range(3)])
    assert sorted(epoch0.tolist()) == list(range(12)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)


def test_data_parallel_ranks_partition_the_global_batch_like_accumulation():
    tokens = torch.arange(8 * 40 + 1)
    single = _stream(tokens, grad_accum_steps=2)
    ranks = [_stream(tokens, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(7):
        acc = single.next_indices()
        per_rank = [r.next_indices()[0] for r in ranks]
        assert [t.tolist() for t in acc] == [t.tolist() for t in per_rank]
        assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())


def test_state_dict_resumes_the_exact_sequence_order():
    tokens = torch.arange(8 * 30 + 1)
    straight = _stream(tokens)
    expected = [straight.next_indices()[0].tolist() for _ in range(25)]
    first = _stream(tokens)
    got = [first.next_indices()[0].tolist() for _ in range(11)]
    resumed = _stream(tokens)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_indices()[0].tolist() for _ in range(14)]
    assert got == expected


def test_resume_with_a_different_global_batch_is_refused():
    tokens = torch.arange(8 * 30 + 1)
    state = _stream(tokens).state_dict()
    with pytest.raises(UserError, match="global batch"):
        _stream(tokens, micro_batch_size=3).load_state_dict(state)


def test_too_little_data_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one global batch"):
        _stream(torch.arange(10), micro_batch_size=4)


def test_eval_batches_are_fixed_and_rank_disjoint():
    tokens = torch.arange(8 * 20 + 1)
    r0 = eval_batches(tokens, 8, 2, 2, dp_rank=0, dp_size=2)
    r1 = eval_batches(tokens, 8, 2, 2, dp_rank=1, dp_size=2)
    assert r0[0][0].tolist() == eval_batches(tokens, 8, 2, 2, 0, 2)[0][0].tolist()
    firsts = {int(x[i, 0]) for batches in (r0, r1) for x, _ in batches for i in range(2)}
    assert len(firsts) == 8
