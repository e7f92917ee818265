"""Evaluation: validation loss at several context lengths (`perplexity`), prompt -> answer tasks and
their greedy exact-match scoring (`tasks`, `answers`), the memory-tail probe (`probe`), results
stored in run directories (`results`), and side-by-side reports with plots (`report`, `plots`)."""
