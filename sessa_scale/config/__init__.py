"""Configuration: the typed schema (`schema.py`), YAML loading with `base:` inheritance and
dotted overrides, and validation that reports every problem at once."""

from sessa_scale.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    ZeroConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "ZeroConfig",
]
