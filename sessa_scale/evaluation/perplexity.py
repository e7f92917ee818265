"""Validation loss and perplexity at several context lengths.

For each context length L the validation token stream is cut into consecutive, non-overlapping
windows of L + 1 tokens (inputs and next-token targets), as many as fit in the token budget, and
the mean next-token cross-entropy (nats/token) is taken over every position. `tail_loss` averages
only the positions in the second half of each window (context of at least L/2 tokens), which is
where a longer context can help.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sessa_scale.errors import UserError
from sessa_scale.models.lm import DecoderLM


@torch.no_grad()
def loss_at_length(
    model: DecoderLM, tokens: torch.Tensor, length: int, max_tokens: int, batch_size: int, autocast=contextlib.nullcontext
) -> dict:
    """{"context_length", "loss", "ppl", "tail_loss", "tokens"} over windows of `length` + 1 tokens of the
    1-D token stream, at most max_tokens predictions; autocast() gives the precision context."""
    n_windows = min((tokens.numel() - 1) // length, max(1, max_tokens // length))
    if n_windows < 1:
        raise UserError(
            f"eval ppl: the validation split holds {tokens.numel()} tokens, fewer than one window of context length "
            f"{length} + 1; use shorter --context-lengths or a dataset with a larger validation split"
        )
    device = next(model.parameters()).device
    total = tail = 0.0
    n_total = n_tail = 0
    starts = list(range(0, n_windows * length, length))
    for s in tqdm(range(0, n_windows, batch_size), desc=f"ppl@{length}", unit="batch", disable=None, leave=False):
        seqs = torch.stack([tokens[i : i + length + 1].long() for i in starts[s : s + batch_size]]).to(device)
        with autocast():
            logits = model(seqs[:, :-1])
        losses = F.cross_entropy(logits.float().transpose(1, 2), seqs[:, 1:], reduction="none")  # (b, L)
        total += losses.sum().item()
        n_total += losses.numel()
        tail += losses[:, length // 2 :].sum().item()
        n_tail += losses[:, length // 2 :].numel()
    loss = total / n_total
    return {
        "context_length": length,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "tail_loss": tail / n_tail,
        "tokens": n_total,
    }
