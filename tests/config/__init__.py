"""Configs (sessa_scale/config, configs/): loading, validation, `sessa-scale config`, vocab_size auto."""
