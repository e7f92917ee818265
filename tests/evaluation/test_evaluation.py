"""Evaluation building blocks: the memory-tail probe against closed forms, the synthetic tasks'
determinism and checkable answers, and greedy exact match on trained and untrained models."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from sessa_scale.config import ModelConfig
from sessa_scale.data import ByteTokenizer
from sessa_scale.errors import UserError
from sessa_scale.evaluation.answers import exact_match, greedy_answers
from sessa_scale.evaluation.probe import (
    fit_power_law,
    influence_by_lag,
    lag_grid,
    probe_model,
    probe_uniform,
    uniform_closed_form,
)
from sessa_scale.evaluation.tasks import (
    PASSKEY_FILLER,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    Record,
    mqar_instance,
    mqar_set,
    passkey_record,
    passkey_set,
    read_records,
    write_records,
)
from sessa_scale.models.registry import build_model


# --- the probe ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.9])
def test_probe_recovers_beta_on_uniform_routing(gamma):
    result = probe_uniform(gamma, length=1024)
    assert abs(result["beta"] - (1 - gamma)) < 0.02, result["beta"]
    assert result["fit_range"] == [64, 1020]
    # Every measured point equals the spec's closed form (RMS over the 4 sources).
    for lag, value in zip(result["lags"], result["influence"]):
        exact = math.sqrt(sum(uniform_closed_form(gamma, j, lag) ** 2 for j in range(4)) / 4)
        assert value == pytest.approx(exact, rel=1e-9)


def test_probe_is_exact_on_a_known_causal_convolution():
    """y_t = sum_l h[l] W x_{t-l} with W orthogonal (D = 5): I(l) = |h[l]| exactly, whatever the
    random output direction, and the fitted exponent is the kernel's."""
    T, D, beta = 200, 5, 0.7
    h = torch.arange(T, dtype=torch.float64).clamp(min=1) ** -beta  # h[l] = l^-beta, h[0] = 1
    W = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]

    def conv(x):  # (B, T', D) -> (B, T', D)
        Tp = x.shape[1]
        idx = torch.arange(Tp)
        lag = idx[:, None] - idx[None, :]
        K = torch.where(lag >= 0, h[lag.clamp(min=0)], torch.zeros((), dtype=torch.float64))  # (T', T')
        return torch.einsum("ts,bsd,ed->bte", K, x, W)

    lags = lag_grid(T - 3, 20)
    infl = influence_by_lag(conv, torch.randn(2, T, D, dtype=torch.float64), lags, n_sources=3, batch_size=7)
    assert infl == pytest.approx([h[l].item() for l in lags], rel=1e-10)
    assert fit_power_law(lags, infl, (2, T))["beta"] == pytest.approx(beta, abs=1e-9)


def test_fit_needs_points_in_range():
    with pytest.raises(UserError, match="fit range"):
        fit_power_law([1, 2, 4, 8], [1.0, 0.5, 0.25, 0.125], (100, 200))


ARCHS = ("sessa", "transformer", "mamba2")


def _tiny(arch: str, d_model: int = 16) -> ModelConfig:
    return ModelConfig(arch=arch, d_model=d_model, n_layers=2, n_heads=2, ssm_state=8, ssm_head_dim=8, ssm_chunk=16)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [None, 1])
def test_probe_model_runs_on_every_architecture(arch, layer):
    torch.manual_seed(0)
    model = build_model(_tiny(arch))
    tokens = torch.randint(0, 257, (2, 65))
    result = probe_model(model, tokens, n_sources=2, layer=layer, n_lags=12)
    assert len(result["lags"]) == len(result["influence"]) and max(result["lags"]) == 63
    assert all(v > 0 and math.isfinite(v) for v in result["influence"])
    assert math.isfinite(result["beta"]) and result["fit_range"] == [4, 63]


# --- synthetic tasks -------------------------------------------------------------------------------


def _parse_context(prompt: str) -> dict:
    context = prompt.split("|")[0]
    return dict(pair.split(":") for pair in context.split(" "))


def test_mqar_is_deterministic_and_its_answers_check():
    a = mqar_set(seed=3, n=5, num_pairs=[4, 13], num_queries=3, key_len=2, value_len=2)
    b = mqar_set(seed=3, n=5, num_pairs=[4, 13], num_queries=3, key_len=2, value_len=2)
    assert a.records == b.records and a.documents == b.documents
    assert mqar_set(seed=4, n=5, num_pairs=[4, 13], num_queries=3, key_len=2, value_len=2).records != a.records
    # instance i does not depend on how many are drawn; the settings are interleaved
    assert mqar_set(seed=3, n=2, num_pairs=[4, 13], num_queries=3, key_len=2, value_len=2).records == a.records[:12]
    assert [r.meta["num_pairs"] for r in a.records[:6]] == [4, 4, 4, 13, 13, 13]
    assert len(a.records) == 2 * 5 * 3 and a.chance == 0.01
    for r in a.records:
        context = _parse_context(r.prompt)
        assert len(context) == r.meta["num_pairs"] and all(len(k) == 2 for k in context)  # distinct keys
        key = re.search(r"(\w+):$", r.prompt).group(1)
        assert r.answer == context[key] and re.fullmatch(r"\d\d", r.answer)
        assert r.length == r.prompt.index("|") + 1
        # the earlier queries appear answered, each correctly
        for k, v in (q.split(":") for q in r.prompt.split("|")[1].split(" ")[:-1]):
            assert context[k] == v
    for doc in a.documents:  # a training document answers every query
        context = _parse_context(doc)
        assert all(context[k] == v for k, v in (q.split(":") for q in doc.split("|")[1].split(" ")))


def test_mqar_rejects_impossible_settings():
    with pytest.raises(UserError, match="distinct keys"):
        mqar_instance(0, 0, num_pairs=27, num_queries=1)
    with pytest.raises(UserError, match="cannot exceed"):
        mqar_instance(0, 0, num_pairs=4, num_queries=5)


@pytest.mark.parametrize("length", [120, 257, 1000])
def test_passkey_has_exact_length_controlled_depth_and_checkable_answer(length):
    records = [passkey_record(seed=7, index=0, length=length, depth=d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert records == [passkey_record(seed=7, index=0, length=length, depth=d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    for depth, r in zip((0.0, 0.25, 0.5, 0.75, 1.0), records):
        assert len(r.prompt) == length == r.length
        assert r.prompt.endswith(PASSKEY_QUESTION)
        key = r.answer.strip()
        assert r.answer == " " + key and len(key) == 5
        needle = PASSKEY_NEEDLE.format(key=key)
        assert r.prompt.count(key) == 2 and r.prompt.index(needle) == r.meta["needle_at"]
        # the needle starts at the filler sentence boundary at or below depth * filler length
        target = round(depth * (length - len(needle) - len(PASSKEY_QUESTION)))
        longest_sentence = max(len(s) + 2 for s in PASSKEY_FILLER.split(". "))
        assert target - longest_sentence < r.meta["needle_at"] <= target
        assert r.meta["needle_at"] == 0 or r.prompt[r.meta["needle_at"] - 2 : r.meta["needle_at"]] == ". "
    keys = {passkey_record(seed=7, index=i, length=length, depth=0.5).answer for i in range(20)}
    assert len(keys) > 15  # the key varies with the index


def test_passkey_too_short_is_a_user_error():
    with pytest.raises(UserError, match="too short"):
        passkey_set(seed=0, n=1, lengths=[50], depths=[0.5])


def test_records_round_trip_and_bad_files_report_every_problem(tmp_path):
    records = mqar_set(seed=0, n=2, num_pairs=[3]).records + [Record("q?", "a")]
    path = tmp_path / "r.jsonl"
    write_records(records, path)
    assert read_records(path) == records
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n{"prompt": 1, "answer": "x"}\n{"prompt": "a", "answer": ""}\n')
    with pytest.raises(UserError) as err:
        read_records(bad)
    assert all(f"bad.jsonl:{n}" in str(err.value) for n in (2, 3, 4))


# --- greedy exact match ------------------------------------------------------------------------------


def _teacher_forced_hits(model, tok, records) -> list[bool]:
    """Independent reference: greedy decoding reproduces the answer iff, at every answer position,
    the argmax of one parallel forward over prompt + answer is the next answer token."""
    hits = []
    for r in records:
        prompt, answer = [tok.eos_id, *tok.encode(r.prompt)], tok.encode(r.answer)
        logits = model(torch.tensor([prompt + answer]))[0]
        predicted = logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)].argmax(-1).tolist()
        hits.append(predicted == answer)
    return hits


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_through_the_cache_matches_teacher_forcing(arch):
    tok = ByteTokenizer()
    records = mqar_set(seed=2, n=3, num_pairs=[3, 5], num_queries=2).records + [Record("", "xy"), Record("ab", "c")]
    torch.manual_seed(1)
    model = build_model(_tiny(arch)).eval()
    predicted = greedy_answers(model, tok, records, batch_size=2)
    assert [p == tok.encode(r.answer) for p, r in zip(predicted, records)] == _teacher_forced_hits(model, tok, records)
    assert [len(p) for p in predicted] == [len(tok.encode(r.answer)) for r in records]


def test_exact_match_is_perfect_after_memorizing_and_chance_before():
    tok = ByteTokenizer()
    tasks = mqar_set(seed=0, n=8, num_pairs=[4], num_queries=2, value_len=2)  # 16 records, chance 1%
    torch.manual_seed(0)
    model = build_model(_tiny("sessa", d_model=32))
    untrained = exact_match(model.eval(), tok, tasks.records, batch_size=5)
    bound = tasks.chance + 3 * math.sqrt(tasks.chance * (1 - tasks.chance) / len(tasks.records))
    assert untrained["accuracy"] <= bound
    assert [p == tok.encode(r.answer) for p, r in zip(greedy_answers(model, tok, tasks.records), tasks.records)] == (
        _teacher_forced_hits(model, tok, tasks.records)
    )

    seqs = [[tok.eos_id, *tok.encode(r.prompt), *tok.encode(r.answer)] for r in tasks.records]
    width = max(map(len, seqs))
    batch = torch.tensor([s + [tok.eos_id] * (width - len(s)) for s in seqs])
    answer_mask = torch.zeros_like(batch, dtype=torch.bool)  # loss on the answer tokens
    for i, r in enumerate(tasks.records):
        answer_mask[i, len(seqs[i]) - len(tok.encode(r.answer)) : len(seqs[i])] = True
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")[answer_mask[:, 1:]].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    trained = exact_match(model, tok, tasks.records, batch_size=5)
    assert trained["accuracy"] == 1.0 and trained["correct"] == 16
    assert trained["by_length"] == [{"length": tasks.records[0].length, "accuracy": 1.0, "n": 16}]
    assert all(_teacher_forced_hits(model, tok, tasks.records))
