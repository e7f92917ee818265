"""One model from a checkpoint, whatever layout it was saved in: tensor-parallel shards
(mp_rank_*_model_states.pt) merged, ZeRO-3 partitions gathered, and checkpoints both TP-split and
ZeRO-3-partitioned read through DeepSpeed's universal form (universal.py). Used by everything that
runs a trained model on one device: generate, eval, probe, export."""

from __future__ import annotations

from pathlib import Path

import torch

from sessa_scale.checkpoint.manager import find_checkpoint, read_meta
from sessa_scale.checkpoint.universal import ensure_universal
from sessa_scale.config import Config, config_from_dict
from sessa_scale.distributed.tp_plan import merge_state_dicts
from sessa_scale.errors import UserError
from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.registry import build_model


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[DecoderLM, Config, Path]:
    """(model in eval mode on `device`, its config, the checkpoint directory) from a run directory (its
    latest complete checkpoint) or a checkpoint directory."""
    checkpoint = find_checkpoint(path)
    cfg = config_from_dict(read_meta(checkpoint)["config"], source=str(checkpoint / "meta.json"))
    model = build_model(cfg.model)
    shards = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))  # one per tensor-parallel rank
    if cfg.zero.stage == 3 and len(shards) > 1:  # partitioned and TP-split: DeepSpeed's universal form merges both
        zero = ensure_universal(checkpoint) / "zero"
        state = {name: torch.load(zero / name / "fp32.pt", weights_only=False)["param"] for name, _ in model.named_parameters()}
        state.update({name: buf for name, buf in model.named_buffers()})  # derived constants (RoPE frequencies)
        if cfg.model.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
    elif cfg.zero.stage == 3:  # parameters are partitioned across ranks: gather them
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    else:
        try:
            states = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in shards]
        except (OSError, RuntimeError, KeyError) as exc:
            raise UserError(f"checkpoint {checkpoint}: cannot read model weights: {exc}") from None
        if not states:
            raise UserError(f"checkpoint {checkpoint}: no model weights (mp_rank_*_model_states.pt) in it")
        state = merge_state_dicts(cfg.model, states) if len(states) > 1 else states[0]
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, checkpoint
