"""The training loop and what it is made of (optimizer, schedule, DeepSpeed engine)."""
