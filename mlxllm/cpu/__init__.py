"""Everything that exists only to make MLX's CPU backend fast.

blas      an optimized CBLAS loaded before mlx.core on Linux, and its thread count
fastexp   exp, silu, softmax and cross-entropy from arithmetic MLX's CPU compiler vectorizes
halves    causal attention as two query halves, with its gradient written out
layers    sequence rotary embeddings and RMSNorm, with their gradients written out
streams   a training step split over one MLX stream per core

The model reaches these through `mlxllm.ops` and `mlxllm.attention`, the training step through
`streams`; `mlxllm/__init__.py` makes the process-wide settings (`blas.setup`, `streams.widen_graph_walk`).
"""
