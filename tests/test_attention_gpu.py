"""The real Metal / CUDA kernels against mx.fast.scaled_dot_product_attention and its gradients.

These need the hardware: on a machine without it they skip and say why.
"""

import mlxllm  # noqa: F401  (must precede mlx.core)
from mlxllm.kernels.fused import fused_attention

import mlx.core as mx
import pytest

BACKENDS = [
    pytest.param(
        "metal",
        marks=[
            pytest.mark.metal,
            pytest.mark.skipif(
                not mx.metal.is_available(), reason="no Metal GPU on this machine (needs a Mac with Apple silicon)"
            ),
        ],
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not mx.cuda.is_available(), reason="MLX's CUDA backend / an NVIDIA GPU is not available on this machine"
            ),
        ],
    ),
]

# (B, H, Hkv, L, D, causal): ragged lengths, GQA, all head dims.
CASES = [(2, 4, 2, 77, 64, True), (1, 8, 1, 300, 128, True), (1, 4, 4, 130, 32, False), (1, 2, 2, 1024, 64, True)]
TOLS = {mx.float32: 2e-4, mx.float16: 2e-2, mx.bfloat16: 8e-2}


def run_case(backend, case, dtype):
    B, H, Hkv, L, D, causal = case
    mx.random.seed(0)
    q = mx.random.normal((B, H, L, D)).astype(dtype)
    k = mx.random.normal((B, Hkv, L, D)).astype(dtype)
    v = mx.random.normal((B, Hkv, L, D)).astype(dtype)
    cot = mx.random.normal((B, H, L, D)).astype(dtype)
    scale = D**-0.5
    mask = "causal" if causal else None

    def fast(q, k, v):
        return (mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask) * cot).astype(mx.float32).sum()

    def fused(q, k, v):
        return (fused_attention(q, k, v, scale=scale, causal=causal, backend=backend) * cot).astype(mx.float32).sum()

    with mx.stream(mx.gpu):
        out = fused_attention(q, k, v, scale=scale, causal=causal, backend=backend)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        got_g = mx.grad(fused, argnums=(0, 1, 2))(q, k, v)
        want_g = mx.grad(fast, argnums=(0, 1, 2))(q, k, v)
        compiled = mx.compile(mx.grad(fused, argnums=(0, 1, 2)))(q, k, v)
    tol = TOLS[dtype]

    def err(a, b):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        return (mx.abs(a - b).max() / (mx.abs(b).max() + 1)).item()  # relative to the output's scale

    assert err(out, want) <= tol
    for name, g, w, c in zip("qkv", got_g, want_g, compiled):
        assert err(g, w) <= tol, f"d{name}"
        assert err(c, w) <= tol, f"compiled d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "B{}_H{}_Hkv{}_L{}_D{}_{}".format(*c[:5], "causal" if c[5] else "full")
)
def test_fused_fp32(backend, case):
    run_case(backend, case, mx.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
def test_fused_half(backend, dtype):
    run_case(backend, CASES[0], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_dispatches_to_kernel(backend):
    from mlxllm import kernels

    with mx.stream(mx.gpu):
        assert kernels.gpu_backend() == backend
