"""Benchmarks of sessa_scale operators."""
