"""Model definitions: the Sessa layer, the shared decoder LM and the architecture registry."""

from sessa_scale.models.lm import DecoderLM
from sessa_scale.models.registry import ARCHITECTURES, ParamCount, build_model, count_parameters, validate_model_config
from sessa_scale.models.sessa import SessaLayer, SessaMixer

__all__ = [
    "ARCHITECTURES",
    "DecoderLM",
    "ParamCount",
    "SessaLayer",
    "SessaMixer",
    "build_model",
    "count_parameters",
    "validate_model_config",
]
