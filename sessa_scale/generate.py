"""Load a trained model from a checkpoint and sample text from it."""

from __future__ import annotations

from pathlib import Path

import torch

from sessa_scale.checkpoint import find_checkpoint, read_meta
from sessa_scale.config import Config, config_from_dict
from sessa_scale.errors import UserError
from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.registry import build_model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[DecoderLM, Config, Path]:
    """Model weights and config from a run directory or checkpoint directory."""
    checkpoint = find_checkpoint(path)
    cfg = config_from_dict(read_meta(checkpoint)["config"], source=str(checkpoint / "meta.json"))
    model = build_model(cfg.model)
    if cfg.zero.stage == 3:  # parameters are partitioned across ranks: gather them
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        states = checkpoint / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(states, map_location="cpu", weights_only=False)["module"]
        except (OSError, RuntimeError, KeyError) as exc:
            raise UserError(f"checkpoint {checkpoint}: cannot read model weights from {states.name}: {exc}") from None
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, checkpoint


@torch.no_grad()
def generate_text(
    model: DecoderLM, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int
) -> str:
    """Sample a continuation of `prompt` (byte-level tokens); stops at end-of-document."""
    from sessa_scale.data import ByteTokenizer

    tokenizer = ByteTokenizer()
    tokens = tokenizer.encode(prompt) or [tokenizer.eos_id]
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([tokens], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return tokenizer.decode(out[0, len(tokens) :].tolist())
