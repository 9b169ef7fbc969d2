import math

import mlxllm  # noqa: F401
from mlxllm import MlxllmError, ModelConfig
from mlxllm.attention import attention, reference_attention
from mlxllm.model import build_model

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten


def test_parameter_names_follow_llama_layout():
    cfg = ModelConfig(vocab_size=50, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)
    names = {k: v.shape for k, v in tree_flatten(build_model(cfg).parameters())}
    assert names["model.embed_tokens.weight"] == (50, 64)
    assert names["lm_head.weight"] == (50, 64)
    assert names["model.norm.weight"] == (64,)
    layer = "model.layers.1."
    assert names[layer + "self_attn.q_proj.weight"] == (64, 64)
    assert names[layer + "self_attn.k_proj.weight"] == (32, 64)  # 2 KV heads of 16
    assert names[layer + "self_attn.v_proj.weight"] == (32, 64)
    assert names[layer + "self_attn.o_proj.weight"] == (64, 64)
    assert names[layer + "mlp.gate_proj.weight"] == (cfg.hidden_dim, 64)
    assert names[layer + "mlp.up_proj.weight"] == (cfg.hidden_dim, 64)
    assert names[layer + "mlp.down_proj.weight"] == (64, cfg.hidden_dim)
    assert names[layer + "input_layernorm.weight"] == (64,)
    assert names[layer + "post_attention_layernorm.weight"] == (64,)
    assert not any("bias" in k for k in names)
    assert sum(math.prod(s) for s in names.values()) == cfg.num_params()


def test_tied_embeddings_share_weights_and_count():
    cfg = ModelConfig(vocab_size=50, n_layers=1, d_model=32, n_heads=2)
    names = dict(tree_flatten(build_model(cfg).parameters()))
    assert "lm_head.weight" not in names
    assert sum(v.size for v in names.values()) == cfg.num_params()


def test_scaled_residual_init():
    cfg = ModelConfig(vocab_size=64, n_layers=8, d_model=128, n_heads=4)
    p = dict(tree_flatten(build_model(cfg, seed=1).parameters()))
    q_std = mx.std(p["model.layers.0.self_attn.q_proj.weight"]).item()
    o_std = mx.std(p["model.layers.0.self_attn.o_proj.weight"]).item()
    assert abs(q_std - 0.02) < 0.002
    assert abs(o_std - 0.02 / math.sqrt(16)) < 0.001
    assert mx.all(p["model.layers.0.input_layernorm.weight"] == 1).item()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(d_model=100, n_heads=3), "divisible by n_heads"),
        (dict(d_model=96, n_heads=32), "must be even"),
        (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
        (dict(attention="magic"), "attention must be one of"),
    ],
)
def test_invalid_shapes_are_explained(kwargs, needle):
    with pytest.raises(MlxllmError, match=needle):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("q_len", [12, 5, 1])
def test_reference_attention_matches_fast(n_kv, q_len):
    q = mx.random.normal((2, 4, q_len, 16), key=mx.random.key(0))
    k = mx.random.normal((2, n_kv, 12, 16), key=mx.random.key(1))
    v = mx.random.normal((2, n_kv, 12, 16), key=mx.random.key(2))
    for causal in (True, False):
        ref = reference_attention(q, k, v, scale=0.25, causal=causal)
        fast = attention(q, k, v, scale=0.25, causal=causal, impl="fast")
        assert mx.allclose(ref, fast, atol=1e-5).item()


@pytest.mark.parametrize("n_kv", [1, 2, 4])
@pytest.mark.parametrize("length", [128, 131])
def test_causal_halves_match_naive_attention_and_its_gradients(n_kv, length):
    from mlxllm.cpu.halves import SPLIT_MIN_LEN, causal_halves_attention

    assert length >= SPLIT_MIN_LEN  # attention(impl="halves") takes the halves path here
    q = mx.random.normal((2, 4, length, 16), key=mx.random.key(0))
    k = mx.random.normal((2, n_kv, length, 16), key=mx.random.key(1))
    v = mx.random.normal((2, n_kv, length, 16), key=mx.random.key(2))
    cot = mx.random.normal(q.shape, key=mx.random.key(3))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, scale=0.25) * cot).sum()

    naive = lambda q, k, v, scale: reference_attention(q, k, v, scale=scale, causal=True)  # noqa: E731
    routed = lambda q, k, v, scale: attention(q, k, v, scale=scale, causal=True, impl="halves")  # noqa: E731
    want = mx.grad(loss(naive), argnums=(0, 1, 2))(q, k, v)
    for fn in (causal_halves_attention, routed):
        assert mx.allclose(fn(q, k, v, scale=0.25), naive(q, k, v, 0.25), atol=1e-5).item()
        for got, ref in zip(mx.grad(loss(fn), argnums=(0, 1, 2))(q, k, v), want):
            assert mx.allclose(got, ref, atol=1e-4).item()


def test_causal_halves_in_bfloat16_keep_the_dtype_and_match_float32():
    from mlxllm.cpu.halves import causal_halves_attention

    q, k, v = (mx.random.normal((2, 4, 128, 16), key=mx.random.key(i)) for i in range(3))
    cot = mx.random.normal(q.shape, key=mx.random.key(3))

    def loss(q, k, v):
        return (causal_halves_attention(q, k, v, scale=0.25).astype(mx.float32) * cot).sum()

    half = [x.astype(mx.bfloat16) for x in (q, k, v)]
    out = causal_halves_attention(*half, scale=0.25)
    assert out.dtype == mx.bfloat16
    assert mx.allclose(out.astype(mx.float32), reference_attention(q, k, v, scale=0.25, causal=True), atol=3e-2).item()
    for got, want in zip(mx.grad(loss, argnums=(0, 1, 2))(*half), mx.grad(loss, argnums=(0, 1, 2))(q, k, v)):
        assert got.dtype == mx.bfloat16
        assert mx.allclose(got.astype(mx.float32), want, atol=5e-2, rtol=5e-2).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_sequence_rope_is_mlx_rope_with_its_gradient(dtype):
    from mlxllm.cpu.layers import rope_angles, sequence_rope

    x = mx.random.normal((2, 40, 3, 16), key=mx.random.key(0)).astype(dtype)  # (B, L, H, D)
    cot = mx.random.normal((2, 3, 40, 16), key=mx.random.key(1)).astype(dtype)

    def mlx_rope(x):
        return mx.fast.rope(x.transpose(0, 2, 1, 3), 16, traditional=False, base=500.0, scale=1.0, offset=0)

    ours = sequence_rope(500.0)
    for table in (False, True):  # angles computed in the graph, then from a longer prepared table
        if table:
            ours = sequence_rope(500.0, rope_angles(64, 16, 500.0))
        assert ours(x).dtype == dtype and ours(x).shape == (2, 3, 40, 16)
        assert mx.allclose(ours(x), mlx_rope(x), atol=1e-6).item()
        grads = [mx.grad(lambda x: (f(x) * cot).astype(mx.float32).sum())(x) for f in (ours, mlx_rope)]  # noqa: B023
        assert grads[0].dtype == dtype and mx.allclose(grads[0], grads[1], atol=1e-6).item()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_rms_norm_is_mlx_rms_norm_with_its_gradient(dtype):
    from mlxllm.model import RMSNorm

    norm = RMSNorm(64, 1e-5)
    norm.weight = mx.random.uniform(0.5, 1.5, (64,), key=mx.random.key(0)).astype(dtype)
    x = mx.random.normal((4, 128, 64), key=mx.random.key(1)).astype(dtype)  # above the size cut-off
    cot = mx.random.normal(x.shape, key=mx.random.key(2)).astype(dtype)

    def grads(f, x, w):
        return mx.grad(lambda x, w: (f(x, w) * cot).astype(mx.float32).sum(), argnums=(0, 1))(x, w)

    def ours(x, w):
        norm.weight = w
        return norm(x)

    mlx = lambda x, w: mx.fast.rms_norm(x, w, 1e-5)  # noqa: E731
    w = norm.weight
    assert mx.array_equal(ours(x, w), mlx(x, w)).item()
    # Against MLX's gradient in fp32: exact to fp32 rounding, or to bf16's resolution (2^-8 relative).
    f32 = [t.astype(mx.float32) for t in (x, w)]
    for got, want in zip(grads(ours, x, w), grads(mlx, *f32)):
        assert got.dtype == dtype
        tol = 1e-5 if dtype == mx.float32 else 1e-2 * mx.abs(want).max().item()
        assert mx.allclose(got.astype(mx.float32), want, atol=tol, rtol=0).item()


def test_fast_cross_entropy_matches_mlx_with_its_gradient():
    from mlxllm.cpu import fastexp

    import mlx.nn as nn

    logits = mx.random.normal((4, 50, 65), key=mx.random.key(0)) * 8  # some rows far from uniform
    targets = mx.random.randint(0, 65, (4, 50), key=mx.random.key(1))
    ours = fastexp.cross_entropy(logits, targets)
    want = nn.losses.cross_entropy(logits, targets, reduction="none")
    assert ours.shape == want.shape and mx.allclose(ours, want, atol=1e-4).item()
    grad = lambda f: mx.grad(lambda z: f(z, targets).mean())(logits)  # noqa: E731
    assert mx.allclose(grad(fastexp.cross_entropy), grad(lambda z, t: nn.losses.cross_entropy(z, t)), atol=1e-6).item()


def test_model_forward_same_for_fast_and_reference_attention():
    base = dict(vocab_size=40, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    ref = build_model(ModelConfig(**base, attention="reference"), seed=3)
    fast = build_model(ModelConfig(**base, attention="fast"), seed=3)
    x = mx.array([[1, 5, 7, 2, 9, 3]])
    assert mx.allclose(ref(x), fast(x), atol=1e-5).item()


def test_causality():
    model = build_model(ModelConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=2), seed=0)
    a = model(mx.array([[1, 2, 3, 4, 5]]))
    b = model(mx.array([[1, 2, 3, 9, 9]]))
    assert mx.allclose(a[:, :3], b[:, :3], atol=1e-6).item()
    assert not mx.allclose(a[:, 3:], b[:, 3:], atol=1e-3).item()
