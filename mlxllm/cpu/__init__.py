"""Everything that exists only to make MLX's CPU backend fast.

blas      an optimized CBLAS loaded before mlx.core on Linux, and its thread count
bf16build the bfloat16 GEMM extension (bf16gemm/gemm.cpp), built just in time into the user cache
bf16matmul bfloat16 matrix products through it (oneDNN's matmul), where measured faster than float32
fastexp   exp, silu, softmax and cross-entropy from arithmetic MLX's CPU compiler vectorizes
halves    causal attention as two query halves, with its gradient written out
layers    sequence rotary embeddings and RMSNorm, with their gradients written out
precision what a bfloat16 run computes in on the CPU
startup   what MLX must be given before its first use (the BLAS, its graph walk's width)
streams   a training step split over one MLX stream per core

The model reaches these through `mlxllm.ops` and `mlxllm.attention`, the training step through
`streams`; `mlxllm/__init__.py` calls `startup.prepare`, the import's one side effect.
"""
