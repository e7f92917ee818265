"""Training (sessa_scale/training, sessa_scale/checkpoint): the CLI runs, checkpoints, precision,
preemption, run safety, TensorBoard."""
