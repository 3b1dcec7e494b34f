"""Triton kernels, one module per op; each is imported (with triton) only when a CUDA tensor needs it."""
