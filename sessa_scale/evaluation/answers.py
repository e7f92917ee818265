"""Prompt -> answer exact-match accuracy: greedy decoding through the model's cache.

Each prompt is preceded by end-of-document (EOS), as every document is in training data. The
model prefills the prompt, then decodes greedily as many tokens as the answer has; a record is
correct when those tokens are exactly the answer's. Records whose prompts have the same number of
tokens are decoded together in one batch (no padding is needed, so every architecture's cache
works unchanged).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm

from sessa_scale.evaluation.tasks import Record
from sessa_scale.models.lm import DecoderLM


def _tokenize(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    return [tokenizer.eos_id, *tokenizer.encode(record.prompt)], tokenizer.encode(record.answer)


@torch.no_grad()
def greedy_answers(model: DecoderLM, tokenizer, records: list[Record], batch_size: int = 32) -> list[list[int]]:
    """The greedy continuation of every record's prompt, as many tokens as its answer has."""
    device = next(model.parameters()).device
    encoded = [_tokenize(tokenizer, r) for r in records]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, (prompt, _) in enumerate(encoded):
        groups[len(prompt)].append(i)
    batches = [ids[s : s + batch_size] for _, ids in sorted(groups.items()) for s in range(0, len(ids), batch_size)]
    out: list[list[int]] = [[] for _ in records]
    for ids in tqdm(batches, desc="decoding", unit="batch", disable=None, leave=False):
        prompt = torch.tensor([encoded[i][0] for i in ids], device=device)
        n_new = max(len(encoded[i][1]) for i in ids)
        generated = model.generate(prompt, n_new, temperature=0.0)[:, prompt.shape[1] :].tolist()
        for row, i in enumerate(ids):
            out[i] = generated[row][: len(encoded[i][1])]
    return out


def exact_match(model: DecoderLM, tokenizer, records: list[Record], batch_size: int = 32) -> dict:
    """{"accuracy", "correct", "n", "by_length": [{"length", "accuracy", "n"}], "examples": first 5}."""
    predictions = greedy_answers(model, tokenizer, records, batch_size)
    hits = [pred == tokenizer.encode(r.answer) for pred, r in zip(predictions, records)]
    by_length: dict[int, list[bool]] = defaultdict(list)
    for hit, r in zip(hits, records):
        if r.length is not None:
            by_length[r.length].append(hit)
    return {
        "accuracy": sum(hits) / len(hits),
        "correct": sum(hits),
        "n": len(hits),
        "by_length": [{"length": L, "accuracy": sum(h) / len(h), "n": len(h)} for L, h in sorted(by_length.items())],
        "examples": [
            {"prompt_tail": r.prompt[-40:], "answer": r.answer, "predicted": tokenizer.decode(p), "correct": h}
            for r, p, h in list(zip(records, predictions, hits))[:5]
        ],
    }
