"""Configuration: the typed schema (`schema.py`), YAML loading with `base:` inheritance and
dotted overrides, and validation that reports every problem at once."""

from sessa_scale.config.loader import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    load_config_with_sources,
    save_config,
)
from sessa_scale.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    ZeroConfig,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "ZeroConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "load_config_with_sources",
    "save_config",
]
