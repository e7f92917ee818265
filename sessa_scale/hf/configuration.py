"""The transformers config of an exported model: sessa_scale's ModelConfig as a dict under
`sessa_scale_model`, mirrored into the standard names transformers and lm-evaluation-harness read
(vocab_size, hidden_size, num_hidden_layers, num_attention_heads, tie_word_embeddings).

No max_position_embeddings: the models take any length (RoPE, recurrences), so transformers does not
warn past a fixed one and lm-evaluation-harness uses its own default context (2048 tokens; its
`max_length` model argument changes it); `training_seq_len` records the length trained on."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from sessa_scale.config.schema import ModelConfig


class SessaScaleConfig(PretrainedConfig):
    """sessa_scale_model: the fields of sessa_scale.config.schema.ModelConfig (missing ones keep their
    defaults); training_seq_len: the run's data.seq_len (information only).

    One subclass per architecture, each its own model_type: transformers' Auto classes map a config
    class to one model class, so per-architecture model classes need per-architecture configs."""

    model_type = "sessa_scale"
    arch: str | None = None  # set by the subclasses

    def __init__(self, sessa_scale_model: dict | None = None, training_seq_len: int | None = None, **kwargs):
        self.sessa_scale_model = dict(sessa_scale_model or {})
        model = self.model_config()
        if self.arch is not None and model.arch != self.arch:
            raise ValueError(f"{type(self).__name__} describes model.arch={self.arch}, sessa_scale_model has {model.arch!r}")
        self.vocab_size = model.vocab_size
        self.hidden_size = model.d_model
        self.num_hidden_layers = model.n_layers
        self.num_attention_heads = model.n_heads
        self.training_seq_len = training_seq_len
        kwargs["tie_word_embeddings"] = model.tie_embeddings
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The ModelConfig this config describes."""
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.sessa_scale_model) - known)
        if unknown:
            raise ValueError(
                f"config.json: sessa_scale_model has keys this sessa_scale version does not know ({', '.join(unknown)}); "
                "install the sessa_scale version that exported the model"
            )
        return ModelConfig(**self.sessa_scale_model)


# Each subclass names __init__ itself: transformers turns a config subclass without its own __init__
# into a dataclass with a generated one.
class SessaConfig(SessaScaleConfig):
    model_type = "sessa_scale_sessa"
    arch = "sessa"
    __init__ = SessaScaleConfig.__init__


class TransformerBaselineConfig(SessaScaleConfig):
    model_type = "sessa_scale_transformer"
    arch = "transformer"
    __init__ = SessaScaleConfig.__init__


class Mamba2BaselineConfig(SessaScaleConfig):
    model_type = "sessa_scale_mamba2"
    arch = "mamba2"
    __init__ = SessaScaleConfig.__init__


# model.arch -> its config class
CONFIG_CLASSES: dict[str, type[SessaScaleConfig]] = {
    cls.arch: cls for cls in (SessaConfig, TransformerBaselineConfig, Mamba2BaselineConfig)
}
