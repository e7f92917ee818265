"""Model definitions: the Sessa layer, the Transformer and Mamba-2 baseline blocks (each module with
its architecture's ArchSpec), the shared decoder LM and the architecture registry."""

from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.mamba2 import Mamba2Block, Mamba2Mixer
from sessa_scale.models.registry import ParamCount, build_model, count_parameters, validate_model_config
from sessa_scale.models.sessa import SessaLayer, SessaMixer
from sessa_scale.models.spec import ARCHITECTURES, ArchSpec, register_architecture
from sessa_scale.models.transformer import TransformerBlock

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "DecoderLM",
    "Mamba2Block",
    "Mamba2Mixer",
    "ParamCount",
    "SessaLayer",
    "SessaMixer",
    "TransformerBlock",
    "build_model",
    "count_parameters",
    "register_architecture",
    "validate_model_config",
]
