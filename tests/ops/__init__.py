"""The numerical operators (sessa_scale/ops, kernels/): feedback solve, SSD scan, fused Mamba-2 kernels."""
