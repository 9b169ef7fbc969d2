"""The tiled MLX reference (what impl='flash' runs on a CPU) against naive attention and its autodiff gradients."""

import json

import mlxllm  # noqa: F401  (must precede mlx.core)
from mlxllm import kernels
from mlxllm.attention import attention, reference_attention
from mlxllm.device import device_name
from mlxllm.kernels import select
from mlxllm.kernels.tiled import tiled_attention, tiled_function

import mlx.core as mx
import mlx.nn as nn
import pytest

TOL = 1e-5


def make(B, H, Hkv, L, D, seed=0, dtype=mx.float32):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, L, D)).astype(dtype)
    k = mx.random.normal((B, Hkv, L, D)).astype(dtype)
    v = mx.random.normal((B, Hkv, L, D)).astype(dtype)
    cot = mx.random.normal((B, H, L, D)).astype(dtype)
    return q, k, v, cot


def max_err(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


# (B, H, Hkv, L, D, causal, tile_q, tile_k): lengths that are not multiples of the tiles, GQA 1/2/4, batch 2.
CASES = [
    (2, 4, 4, 37, 32, True, 16, 8),
    (1, 4, 2, 50, 64, True, 16, 16),
    (2, 4, 1, 29, 64, False, 8, 16),
    (1, 8, 2, 33, 128, True, 32, 8),
    (1, 2, 2, 70, 32, False, 32, 32),
    (1, 2, 1, 1, 64, True, 16, 16),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "B{}_H{}_Hkv{}_L{}_D{}_{}_t{}x{}".format(*c[:5], "causal" if c[5] else "full", *c[6:])
)
def test_tiled_matches_naive_and_its_gradients(case):
    B, H, Hkv, L, D, causal, tq, tk = case
    q, k, v, cot = make(B, H, Hkv, L, D)
    scale = D**-0.5

    def naive(q, k, v):
        return (reference_attention(q, k, v, scale=scale, causal=causal) * cot).sum()

    def tiled(q, k, v):
        return (tiled_attention(q, k, v, scale=scale, causal=causal, tile_q=tq, tile_k=tk) * cot).sum()

    out = tiled_attention(q, k, v, scale=scale, causal=causal, tile_q=tq, tile_k=tk)
    assert max_err(out, reference_attention(q, k, v, scale=scale, causal=causal)) <= TOL
    want = mx.grad(naive, argnums=(0, 1, 2))(q, k, v)
    got = mx.grad(tiled, argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert g.shape == w.shape
        assert max_err(g, w) <= TOL, f"d{name}"


def test_log_sum_exp_output_and_its_cotangent():
    q, k, v, cot = make(1, 4, 2, 21, 32)
    scale = 32**-0.5
    fn = tiled_function(scale, True, 8, 8)
    o, lse = fn(q, k, v)
    s = (q.reshape(1, 2, 2, 21, 32) * scale) @ k[:, :, None].swapaxes(-1, -2)
    s = mx.where(mx.arange(21)[:, None] >= mx.arange(21)[None], s, -mx.inf)
    assert lse.dtype == mx.float32
    assert max_err(lse, mx.logsumexp(s, axis=-1).reshape(1, 4, 21)) <= TOL

    # A loss that uses the log-sum-exp too: its gradient goes through the same backward (dS += dlse * P).
    w = mx.random.normal(lse.shape)

    def tiled_loss(q, k, v):
        o, lse = fn(q, k, v)
        return (o * cot).sum() + (lse * w).sum()

    def naive_loss(q, k, v):
        s = (q.reshape(1, 2, 2, 21, 32) * scale) @ k[:, :, None].swapaxes(-1, -2)
        s = mx.where(mx.arange(21)[:, None] >= mx.arange(21)[None], s, -mx.inf)
        lse = mx.logsumexp(s, axis=-1).reshape(1, 4, 21)
        return (reference_attention(q, k, v, scale=scale, causal=True) * cot).sum() + (lse * w).sum()

    got = mx.grad(tiled_loss, argnums=(0, 1, 2))(q, k, v)
    for g, want in zip(got, mx.grad(naive_loss, argnums=(0, 1, 2))(q, k, v)):
        assert max_err(g, want) <= TOL


def test_half_precision_inputs():
    for dtype in (mx.float16, mx.bfloat16):
        q, k, v, _ = make(1, 2, 1, 40, 64, dtype=dtype)
        out = tiled_attention(q, k, v, scale=0.125, causal=True, tile_q=16, tile_k=16)
        assert out.dtype == dtype
        ref = reference_attention(*(x.astype(mx.float32) for x in (q, k, v)), scale=0.125, causal=True)
        assert max_err(out, ref) <= 2e-2


def test_compiled_training_step_through_tiled():
    q, k, v, cot = make(2, 4, 2, 45, 32)
    scale = 32**-0.5

    def loss(q, k, v):
        return (tiled_attention(q, k, v, scale=scale, causal=True, tile_q=16, tile_k=16) * cot).sum()

    def naive(q, k, v):
        return (reference_attention(q, k, v, scale=scale, causal=True) * cot).sum()

    step = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))
    val, grads = step(q, k, v)
    val2, grads2 = step(q, k, v)  # second call runs the cached compiled graph
    want_val, want = mx.value_and_grad(naive, argnums=(0, 1, 2))(q, k, v)
    assert abs(val.item() - want_val.item()) <= 1e-3
    for g, g2, w in zip(grads, grads2, want):
        assert max_err(g, w) <= TOL and max_err(g2, w) <= TOL


class TinyAttention(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.impl = impl
        self.qkv = nn.Linear(32, 3 * 32, bias=False)

    def __call__(self, x):
        B, L, _ = x.shape
        q, k, v = (t.reshape(B, L, 2, 16).transpose(0, 2, 1, 3) for t in mx.split(self.qkv(x), 3, axis=-1))
        # 16 is not a supported kernel head dim but the tiled path takes any D
        return attention(q, k, v, scale=0.25, causal=True, impl=self.impl).sum()


@pytest.mark.skipif(
    kernels.gpu_backend() is not None,
    reason="on a GPU flash runs the fused kernels, which tests/test_attention_gpu.py checks",
)
def test_flash_through_model_attention_on_cpu():
    q, k, v, cot = make(1, 4, 2, 40, 64)
    scale = 0.125
    out = attention(q, k, v, scale=scale, causal=True, impl="flash")
    assert max_err(out, reference_attention(q, k, v, scale=scale, causal=True)) <= TOL

    # nn.value_and_grad of a module whose attention is impl="flash", compiled.
    mx.random.seed(3)
    x = mx.random.normal((2, 24, 32))
    flash, ref = TinyAttention("flash"), TinyAttention("reference")
    ref.update(flash.parameters())
    step = mx.compile(nn.value_and_grad(flash, lambda x: flash(x)), inputs=flash.state)
    val, grads = step(x)
    want_val, want = nn.value_and_grad(ref, lambda x: ref(x))(x)
    assert abs(val.item() - want_val.item()) <= 1e-3
    assert max_err(grads["qkv"]["weight"], want["qkv"]["weight"]) <= 1e-4


def test_resolve_auto_default_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path))
    select._recorded.cache_clear()
    assert kernels.resolve_auto() == ("halves" if kernels.gpu_backend() is None else "fast")  # the default
    path = kernels.record_choice("tiled")
    assert path == tmp_path / "attention.json"
    assert json.loads(path.read_text()) == {device_name(): "tiled"}
    assert kernels.resolve_auto() == "tiled"
    path.write_text(json.dumps({device_name(): "bogus"}))
    select._recorded.cache_clear()
    assert kernels.resolve_auto() == "halves"  # an unknown entry is ignored
    select._recorded.cache_clear()


def test_bench_attention_rows_and_recorded_choice(tmp_path, monkeypatch):
    from mlxllm.bench.attention import bench_attention
    from mlxllm.kernels import select
    from mlxllm.kernels.select import Shape, resolve_auto

    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path))  # the recorded choice stays out of other tests
    select._recorded.cache_clear()
    rows = bench_attention((64, 160), batch=1, heads=2, head_dim=32, record=True)
    impls = {r["impl"] for r in rows}
    assert {"reference", "halves", "fast", "tiled"} <= impls
    assert {r["L"] for r in rows} == {64, 160}
    assert all(r["ms"] > 0 and r["peak_mb"] > 0 for r in rows)
    recorded = [r["impl"] for r in rows if r.get("recorded")]
    assert len(set(recorded)) == 1 and recorded[0] != "reference"  # only a real implementation is recorded
    shape = Shape(device_name(), "float32", 32, training=True)  # what the benchmark timed: its record's key
    assert resolve_auto(shape) == recorded[0]
    # The tiled path never holds the L x L scores: less peak memory than the naive one at the longer length.
    peak = {r["impl"]: r["peak_mb"] for r in rows if r["L"] == 160}
    assert peak["tiled"] < peak["reference"]
    monkeypatch.undo()
    select._recorded.cache_clear()
    assert select._recorded(str(select.cache_path()), device_name()) is None  # nothing leaked
    assert select._recorded(str(select.cache_path()), shape.key) is None


def test_reference_is_the_plain_path_at_every_length_and_old_records_of_it_read_as_halves(tmp_path, monkeypatch):
    from mlxllm.cpu.halves import SPLIT_MIN_LEN, causal_halves_attention

    q, k, v = (mx.random.normal((1, 2, SPLIT_MIN_LEN + 32, 16), key=mx.random.key(i)) for i in range(3))
    plain = reference_attention(q, k, v, scale=0.25, causal=True)
    assert mx.array_equal(attention(q, k, v, scale=0.25, causal=True, impl="reference"), plain).item()
    halves = attention(q, k, v, scale=0.25, causal=True, impl="halves")
    assert mx.array_equal(halves, causal_halves_attention(q, k, v, scale=0.25)).item()
    # A choice recorded when 'reference' named the halves path still means what it ran.
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path))
    select._recorded.cache_clear()
    (tmp_path / "attention.json").write_text(json.dumps({device_name(): "reference"}))
    assert kernels.resolve_auto() == "halves"
    with pytest.raises(ValueError):
        kernels.record_choice("reference")  # the baseline is never the faster choice
    select._recorded.cache_clear()
