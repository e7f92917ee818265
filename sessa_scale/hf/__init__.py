"""Hugging Face interop: `sessa-scale export` (a checkpoint -> a transformers model directory with
safetensors weights, config.json, tokenizer and remote code), the transformers model classes that
load it (`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`), `model.init_from`
(training from an exported directory), and the lm-evaluation-harness bridge.

Needs the `hf` extra (transformers, safetensors): `pip install -e ".[hf]"`; `model.init_from` needs
only safetensors, the bridge the `lm-eval` extra. Modules: configuration.py (the config classes),
modeling.py (the model classes and their decoding cache), tokenizer.py (the exported tokenizer
files), export.py (export and init_from), harness.py (scoring with lm-evaluation-harness).
"""
