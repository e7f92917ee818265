"""The models (sessa_scale/models): the Sessa layer, the LM and registry, the baselines, FLOP counts."""
