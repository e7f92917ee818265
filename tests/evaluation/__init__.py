"""Using trained runs (sessa_scale/evaluation, sessa_scale/hf): eval, probe, report, HF export, lm-eval."""
