"""The architecture registry: every architecture's ArchSpec registered once, and what the framework
does with a model config through it: validate, build, count parameters and training FLOPs."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sessa_scale.config.schema import ModelConfig
from sessa_scale.errors import UserError
from sessa_scale.models.attention import ATTENTION_BACKENDS
from sessa_scale.models.flops import training_flops_per_token
from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.mamba2 import MAMBA2, MIXER_KERNELS, SSM_INTS
from sessa_scale.models.sessa import SESSA
from sessa_scale.models.spec import ARCHITECTURES, Problem, is_int, problem_lines, register_architecture
from sessa_scale.models.transformer import MLP_KINDS, TRANSFORMER
from sessa_scale.ops.feedback_solve import FEEDBACK_SOLVE_IMPLS
from sessa_scale.ops.ssd import SSD_IMPLS

# Adding an architecture: its module's ArchSpec goes here (see sessa_scale/models/spec.py).
BUILTIN_ARCHITECTURES = (SESSA, TRANSFORMER, MAMBA2)
for _spec in BUILTIN_ARCHITECTURES:
    register_architecture(_spec)

INIT_MODES = ("pytorch", "scaled")
RESIDUAL_DTYPES = ("float32", "compute")  # model.residual_dtype


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def model_config_problems(cfg: ModelConfig) -> list[Problem]:
    """Every problem of cfg as (ModelConfig key, "<what is wrong>; <what is allowed>") ([] if valid):
    every key's type and range (whatever the architecture: the schema is shared), then the rules of
    cfg.arch's own spec. A mistyped value is reported once, and the checks that need it are skipped."""
    problems = []

    def bad(key: str, wrong: str, allowed: str) -> None:
        problems.append((key, f"{wrong}; {allowed}"))

    def choice(key: str, what: str, allowed: list[str]) -> None:
        value = getattr(cfg, key)
        if not isinstance(value, str) or value not in allowed:
            bad(key, f"unknown {what} {value!r}", f"choose from {allowed}")

    ints = {}  # the integer fields that are integers; n_kv_heads None means n_heads
    nullable = {"n_kv_heads", "mlp_hidden"}
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "n_fb_heads", "mlp_hidden", *SSM_INTS):
        value = getattr(cfg, key)
        if key == "n_kv_heads" and value is None:
            value = cfg.n_heads
        if is_int(value):
            ints[key] = value
        elif key not in nullable or value is not None:
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
    for key in ("mlp_hidden", *SSM_INTS):
        if key in ints and ints[key] < 1:
            bad(key, f"{ints[key]} is too small", "it must be >= 1")
    chunk = ints.get("ssm_chunk")
    if chunk is not None and (chunk < 16 or chunk & (chunk - 1)):
        bad("ssm_chunk", f"{chunk} is not a power of two >= 16", "use e.g. 64 (the GPU kernel needs a power of two)")
    choice("mlp", "Transformer MLP", list(MLP_KINDS))
    choice("ssm_scan", "SSD scan", ["auto", *SSD_IMPLS])
    choice("ssm_kernels", "Mamba-2 conv/norm kernels", list(MIXER_KERNELS))
    if cfg.solver == "triton" and "triton" not in FEEDBACK_SOLVE_IMPLS:  # registered only where it can run
        bad("solver", "'triton' needs CUDA (a GPU, and the triton package that CUDA builds of torch bring)",
            "without CUDA use auto (= chunked there), chunked or dense")  # fmt: skip
    else:
        choice("solver", "feedback solver", ["auto", *FEEDBACK_SOLVE_IMPLS])
    choice("attention", "attention backend", list(ATTENTION_BACKENDS))
    choice("init", "init mode", list(INIT_MODES))
    choice("residual_dtype", "residual stream dtype", list(RESIDUAL_DTYPES))
    spec = ARCHITECTURES.get(cfg.arch) if isinstance(cfg.arch, str) else None
    return problems + (spec.validate(cfg) if spec is not None else [])


def validate_model_config(cfg: ModelConfig) -> list[str]:
    """Every problem of cfg, each as "model.<key>: <what is wrong>; <what is allowed>" ([] if valid)."""
    return problem_lines(model_config_problems(cfg))


def build_model(cfg: ModelConfig) -> DecoderLM:
    """The DecoderLM of cfg on the current default device (raises UserError listing every problem)."""
    problems = validate_model_config(cfg)
    if problems:
        raise UserError("invalid model config:\n" + "\n".join(problems))
    build_block = ARCHITECTURES[cfg.arch].build_block
    return DecoderLM(cfg, lambda layer_idx: build_block(cfg, layer_idx))


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


def count_training_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token at sequence length seq_len (forward + backward; see
    sessa_scale.models.flops for what is counted)."""
    return training_flops_per_token(cfg, seq_len)
