"""Sample text from a trained model (load it with sessa_scale.checkpoint.merge.load_model)."""

from __future__ import annotations

import torch

from sessa_scale.models.lm import DecoderLM


@torch.no_grad()
def generate_text(
    model: DecoderLM,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    tokenizer=None,
) -> str:
    """Sample a continuation of `prompt`; stops at end-of-document. tokenizer: the run's
    (sessa_scale.data.setup.tokenizer_for(cfg.data)); default byte-level."""
    from sessa_scale.data import ByteTokenizer

    tokenizer = tokenizer or ByteTokenizer()
    tokens = tokenizer.encode(prompt) or [tokenizer.eos_id]
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([tokens], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokenizer.decode(out[0, len(tokens) :].tolist())
