"""What the framework knows about one architecture, as one ArchSpec defined in the architecture's own
module (sessa.py, transformer.py, mamba2.py) and registered once (sessa_scale/models/registry.py).

Everything else reaches an architecture through its spec: the registry builds and validates models
with it, sessa_scale.models.flops counts FLOPs with it, sessa_scale.distributed.tp_plan splits it.
Parameter counts need no entry: they are exact from the built model (registry.count_parameters).

Adding an architecture: a module under sessa_scale/models/ with its block (the
sessa_scale.models.lm.Block protocol) and its ArchSpec, and the spec added to registry.py's
BUILTIN_ARCHITECTURES. Its keys are ModelConfig's (a flat schema shared by every architecture;
a new knob is a new field documented there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from sessa_scale.config.schema import ModelConfig

if TYPE_CHECKING:
    import torch.nn as nn

    from sessa_scale.distributed.tp_styles import Style

Problem = tuple[str, str]  # (ModelConfig field, "what is wrong; what is allowed")


def no_problems(cfg: ModelConfig, *args) -> list[Problem]:
    """The default of ArchSpec.validate and ArchSpec.tp_problems: no rules of the architecture's own."""
    return []


@dataclass(frozen=True)
class ArchSpec:
    name: str  # the model.arch value that selects it
    build_block: Callable[[ModelConfig, int], nn.Module]  # (cfg, layer_idx) -> one residual block (lm.Block)
    layer_flops: Callable[[ModelConfig, int], int]  # (cfg, T) -> forward FLOPs of one block on a sequence of T tokens (the mean over the model's blocks if they differ), counted as sessa_scale.models.flops says
    validate: Callable[[ModelConfig], list[Problem]] = no_problems  # the architecture's own cross-key rules; every key's type and range is checked for all architectures first (registry.model_config_problems), a rule skips keys that are mistyped
    tp_plan: Callable[[ModelConfig], dict[str, Style]] | None = None  # block path -> split style (sessa_scale.distributed.tp_styles); None: no tensor parallelism
    tp_problems: Callable[[ModelConfig, int], list[Problem]] = no_problems  # (cfg, tp) -> why cfg's blocks cannot be split over tp ranks (d_model and vocab_size are checked for all)


# model.arch -> its spec; filled by register_architecture (registry.py registers the built-in ones)
ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    """Make spec.name a valid model.arch (raises ValueError if the name is taken)."""
    if spec.name in ARCHITECTURES:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    ARCHITECTURES[spec.name] = spec
    return spec


def problem_lines(problems: list[Problem]) -> list[str]:
    """Problems as the lines errors show: "model.<key>: <what is wrong>; <what is allowed>"."""
    return [f"model.{key}: {problem}" for key, problem in problems]


def is_int(value) -> bool:
    """Whether a config value is an integer (bools are not)."""
    return isinstance(value, int) and not isinstance(value, bool)
