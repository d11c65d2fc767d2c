"""Optimisers: LoRA-Pro and zeroth order, with their small dense kernels."""
