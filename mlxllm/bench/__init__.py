"""Benchmarks that ship with mlxllm: `mlxllm bench train` and `mlxllm bench attention`.

train            the training step side by side with a plain MLX loop and PyTorch
workers          the benchmark's worker processes, one per implementation
torch_reference  the same model and step in PyTorch, the reference the benchmark compares against
attention        attention implementations' time and memory, forward and backward
"""
