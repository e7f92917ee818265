"""Architecture registry: name -> block builder, model construction, config validation and
exact parameter counts."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from sessa_scale.config.schema import ModelConfig
from sessa_scale.errors import UserError
from sessa_scale.models.attention import ATTENTION_BACKENDS
from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.sessa import SessaLayer
from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS

INIT_MODES = ("pytorch", "scaled")


def build_sessa_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The layer_idx-th Sessa block of a model described by cfg."""
    return SessaLayer(
        cfg.d_model,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        ln_eps=cfg.ln_eps,
        use_flash=cfg.attention == "flash",
        use_forward_rope=cfg.rope,
        gamma_max=cfg.gamma_max,
        n_fb_heads=cfg.n_fb_heads,
        solver=cfg.solver,
    )


# arch name -> builder(cfg, layer_idx) of one residual block following sessa_scale.models.lm.Block
ARCHITECTURES: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"sessa": build_sessa_block}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_model_config(cfg: ModelConfig) -> list[str]:
    """Every problem of cfg, each as "model.<key>: <what is wrong>; <what is allowed>" ([] if valid).
    A mistyped value is reported once, and the checks that need it are skipped."""
    problems = []

    def bad(key: str, wrong: str, allowed: str) -> None:
        problems.append(f"model.{key}: {wrong}; {allowed}")

    def choice(key: str, what: str, allowed: list[str]) -> None:
        value = getattr(cfg, key)
        if not isinstance(value, str) or value not in allowed:
            bad(key, f"unknown {what} {value!r}", f"choose from {allowed}")

    ints = {}  # the integer fields that are integers; n_kv_heads None means n_heads
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "n_fb_heads"):
        value = getattr(cfg, key)
        if key == "n_kv_heads" and value is None:
            value = cfg.n_heads
        if _is_int(value):
            ints[key] = value
        elif key != "n_kv_heads" or cfg.n_kv_heads is not None:
            bad(key, f"{value!r} is not an integer", "give an integer")
    numbers = {key: getattr(cfg, key) for key in ("gamma_max", "init_std") if _is_number(getattr(cfg, key))}
    for key in ("gamma_max", "init_std"):
        if key not in numbers:
            bad(key, f"{getattr(cfg, key)!r} is not a number", "give a number")

    choice("arch", "architecture", sorted(ARCHITECTURES))
    for key in ("vocab_size", "n_layers", "d_model"):
        if key in ints and ints[key] < 1:
            bad(key, f"{ints[key]} is too small", "it must be >= 1")
    D, H = ints.get("d_model"), ints.get("n_heads")
    if D is not None and H is not None:
        if H < 1 or D % H != 0:
            bad("n_heads", f"{H} does not divide d_model={D}", "use a positive divisor of d_model")
        elif cfg.rope and (D // H) % 2 != 0:
            bad(
                "n_heads",
                f"RoPE needs an even head dim, but d_model / n_heads = {D // H}",
                "choose n_heads so that d_model / n_heads is even, or set model.rope=false",
            )
    n_kv = ints.get("n_kv_heads")
    if H is not None and H >= 1 and n_kv is not None and not (1 <= n_kv <= H and H % n_kv == 0):
        bad("n_kv_heads", f"{n_kv} does not divide n_heads={H}", "use a divisor of n_heads, or null for n_heads")
    H_b = ints.get("n_fb_heads")
    if D is not None and H_b is not None and (H_b < 1 or D % H_b != 0):
        bad("n_fb_heads", f"{H_b} does not divide d_model={D}", "use a positive divisor of d_model")
    if "gamma_max" in numbers and not 0.0 < numbers["gamma_max"] < 1.0:
        bad("gamma_max", f"{numbers['gamma_max']} is outside (0, 1)", "it must lie strictly inside (0, 1), e.g. 0.999")
    if "init_std" in numbers and not numbers["init_std"] > 0:
        bad("init_std", f"{numbers['init_std']} is not positive", "it must be > 0 (default 0.02)")
    choice("solver", "feedback solver", ["auto", *FEEDBACK_SOLVE_IMPLS])
    choice("attention", "attention backend", list(ATTENTION_BACKENDS))
    choice("init", "init mode", list(INIT_MODES))
    return problems


def build_model(cfg: ModelConfig) -> DecoderLM:
    """The DecoderLM of cfg on the current default device (raises UserError listing every problem)."""
    problems = validate_model_config(cfg)
    if problems:
        raise UserError("invalid model config:\n" + "\n".join(problems))
    builder = ARCHITECTURES[cfg.arch]
    return DecoderLM(cfg, lambda layer_idx: builder(cfg, layer_idx))


class ParamCount(NamedTuple):
    total: int  # every parameter, tied weights once
    non_embedding: int  # total minus the embedding and an untied LM head


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Exact parameter counts of build_model(cfg), built on the meta device (instant at any size)."""
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    return ParamCount(total, total - embedding)
