"""`sessa-scale export`: a checkpoint -> a Hugging Face model directory, and `model.init_from`:
training from such a directory.

    DIR/model.safetensors           fp32 weights of the full model (TP shards merged, ZeRO partitions
                                    gathered, through sessa_scale.checkpoint.merge.load_model), keys "model.<name>"
                                    as in SessaScaleForCausalLM; a tied LM head is stored once (the embedding)
    DIR/config.json                 the architecture's SessaScaleConfig, auto_map -> the remote code below
    DIR/generation_config.json      EOS = pad token; no sampling settings
    DIR/tokenizer.json, tokenizer_config.json   the run's tokenizer (sessa_scale/hf/tokenizer.py)
    DIR/configuration_sessa_scale.py, modeling_sessa_scale.py
                                    remote code for trust_remote_code: each imports its classes from the
                                    installed sessa_scale package (the model code is not copied: one
                                    implementation, whatever the version; loading needs sessa_scale installed)
    DIR/sessa_scale.json            provenance: checkpoint, step, the run's full config, tokenizer identity

The directory is written as DIR.partial and renamed when complete; an existing non-empty DIR is
never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from sessa_scale.config.schema import RUNTIME_MODEL_KEYS, ModelConfig
from sessa_scale.errors import UserError

WEIGHTS = "model.safetensors"
EXPORT_META = "sessa_scale.json"
WEIGHT_PREFIX = "model."  # SessaScaleForCausalLM.model is the DecoderLM

_REMOTE_CODE_HEADER = (
    '"""Remote code of a model exported by `sessa-scale export`. The classes live in the sessa_scale\n'
    "package, which must be installed to load this model: pip install -e \".[hf]\" in a sessa_scale checkout.\"\"\"\n\n"
)
REMOTE_CODE = {
    "configuration_sessa_scale.py": "from sessa_scale.hf.configuration import (  # noqa: F401\n"
    "    Mamba2BaselineConfig,\n    SessaConfig,\n    TransformerBaselineConfig,\n)\n",
    "modeling_sessa_scale.py": "from sessa_scale.hf.modeling import (  # noqa: F401\n"
    "    Mamba2BaselineForCausalLM,\n    SessaForCausalLM,\n    TransformerBaselineForCausalLM,\n)\n",
}


def portable_model_config(cfg: ModelConfig) -> ModelConfig:
    """cfg as exported: the portable attention backend (sdpa), no activation checkpointing and no
    init_from; none of these change the weights or the function."""
    return dataclasses.replace(cfg, attention="sdpa", activation_checkpointing=False, init_from=None)


def export_model(path: str | Path, out: str | Path) -> dict:
    """Export the checkpoint or run directory `path` (its latest checkpoint) to the directory `out`
    (module docstring); returns {"out", "checkpoint", "step", "arch", "parameters", "files"}."""
    try:
        from safetensors.torch import save_file
        from transformers import GenerationConfig

        from sessa_scale.hf.configuration import CONFIG_CLASSES
        from sessa_scale.hf.modeling import CAUSAL_LM_CLASSES
        from sessa_scale.hf.tokenizer import write_tokenizer
    except ImportError as exc:
        raise UserError(f"export needs the `hf` extra ({exc.name} is missing): pip install -e \".[hf]\"") from None
    from sessa_scale.checkpoint import read_meta
    from sessa_scale.config import config_to_dict
    from sessa_scale.data.setup import tokenizer_for
    from sessa_scale.checkpoint.merge import load_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; choose a new directory (nothing is overwritten)")
    model, cfg, checkpoint = load_model(path)
    if cfg.model.arch not in CONFIG_CLASSES:
        raise UserError(
            f"{checkpoint} holds a {cfg.model.arch!r} model, which has no Hugging Face classes; export covers "
            f"{', '.join(sorted(CONFIG_CLASSES))} (add the architecture's config and model classes to "
            "sessa_scale/hf/configuration.py and modeling.py to export it)"
        )
    tokenizer = tokenizer_for(cfg.data)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # debris of an interrupted export
    partial.mkdir(parents=True)

    state = {WEIGHT_PREFIX + name: value.contiguous() for name, value in model.state_dict().items()}
    if cfg.model.tie_embeddings:
        del state[WEIGHT_PREFIX + "lm_head.weight"]  # the embedding; transformers ties it back on load
    save_file(state, str(partial / WEIGHTS), metadata={"format": "pt"})

    model_cfg = portable_model_config(cfg.model)
    cls, config_cls = CAUSAL_LM_CLASSES[model_cfg.arch], CONFIG_CLASSES[model_cfg.arch]
    eos = tokenizer.eos_id
    hf_config = config_cls(
        sessa_scale_model=dataclasses.asdict(model_cfg),
        training_seq_len=cfg.data.seq_len,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype="float32",
        architectures=[cls.__name__],
        auto_map={
            "AutoConfig": f"configuration_sessa_scale.{config_cls.__name__}",
            "AutoModelForCausalLM": f"modeling_sessa_scale.{cls.__name__}",
        },
    )
    hf_config.to_json_file(partial / "config.json")  # not save_pretrained: it would copy registered classes' source
    GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(partial)
    write_tokenizer(tokenizer, partial)
    for name, code in REMOTE_CODE.items():
        (partial / name).write_text(_REMOTE_CODE_HEADER + code)
    step = read_meta(checkpoint)["step"]
    meta = {"format": 1, "checkpoint": str(checkpoint), "step": step, "config": config_to_dict(cfg), "tokenizer": tokenizer.identity()}
    (partial / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n")

    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    return {
        "out": str(out),
        "checkpoint": str(checkpoint),
        "step": step,
        "arch": model_cfg.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "files": sorted(p.name for p in out.iterdir()),
    }


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"model.init_from: cannot read {path} ({exc}); {what}") from None


def init_from_export(model: torch.nn.Module, cfg: ModelConfig, tokenizer: dict) -> None:
    """Load the weights of the exported directory cfg.init_from into `model` (a DecoderLM built from
    cfg, not yet split for tensor parallelism). The export must describe the same model (every
    ModelConfig key that shapes the weights) and share the run's tokenizer (`tokenizer`: the
    dataset manifest's identity); every mismatch is reported in one UserError."""
    directory = Path(cfg.init_from)
    hint = "model.init_from must name a directory written by `sessa-scale export`"
    if not directory.is_dir():
        raise UserError(f"model.init_from: {directory} does not exist; {hint}")
    exported = _read_json(directory / "config.json", hint).get("sessa_scale_model", {})
    meta = _read_json(directory / EXPORT_META, hint)
    mine = dataclasses.asdict(cfg)
    problems = [
        f"model.{key}: the export has {exported.get(key)!r}, this config {mine[key]!r}"
        for key in mine
        if key not in RUNTIME_MODEL_KEYS and exported.get(key, mine[key]) != mine[key]
    ]
    theirs = meta.get("tokenizer", {})
    if any(theirs.get(k) != tokenizer.get(k) for k in ("kind", "name", "vocab_size", "eos_id")):
        problems.append(
            f"the export was trained with tokenizer {theirs.get('name')} (vocab {theirs.get('vocab_size')}), this run's "
            f"data uses {tokenizer.get('name')} (vocab {tokenizer.get('vocab_size')}); token ids would mean other text"
        )
    if problems:
        raise UserError(f"model.init_from={directory} does not fit this run: " + "; ".join(problems))
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError('model.init_from needs the safetensors package: pip install -e ".[hf]"') from None
    try:
        state = {name.removeprefix(WEIGHT_PREFIX): value for name, value in load_file(str(directory / WEIGHTS)).items()}
    except (OSError, RuntimeError) as exc:
        raise UserError(f"model.init_from: cannot read {directory / WEIGHTS} ({exc}); {hint}") from None
    if cfg.tie_embeddings and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"model.init_from: the weights in {directory / WEIGHTS} do not fit the model: {exc}") from None
