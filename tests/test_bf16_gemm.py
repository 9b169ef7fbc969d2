"""The CPU's bfloat16 path: oneDNN's bfloat16 matmul behind an MLX primitive (cpu/bf16gemm, built just in time),
its products and gradients, and the choice that never lets a bfloat16 run take MLX's own slow matmul."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlxllm  # noqa: F401  (the BLAS first)
from mlxllm import ops
from mlxllm.config import ModelConfig, TrainConfig
from mlxllm.cpu import bf16build, bf16matmul
from mlxllm.cpu.precision import FORCE_ENV, compute_dtype
from mlxllm.model import build_model
from mlxllm.step import make_optimizer, make_step

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ext():
    """The built extension (built once per test session, into its private cache; the test extra installs
    oneDNN on Linux x86-64)."""
    if bf16build.unsupported():
        pytest.skip(bf16build.unsupported())
    module, reason = bf16build.load()
    assert module is not None, reason
    broken = bf16matmul.works(module)
    if broken:  # oneDNN builds everywhere, but has no bfloat16 matmul without AVX-512 (AMD Zen 3, say)
        pytest.skip(f"{broken}: this CPU gets the float32 path (test_a_failing_extension_keeps_float32...)")
    return module


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """choose() decided anew, its measurement cached in an empty cache, and forgotten after."""
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path))
    bf16matmul.choose.cache_clear()
    monkeypatch.setattr(bf16matmul, "_chosen", False)
    yield
    bf16matmul.choose.cache_clear()


def _rounded(x: mx.array) -> mx.array:
    return x.astype(mx.bfloat16).astype(mx.float32)


def _normal(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed))


LAYOUTS = {
    "plain": lambda a, b: (a, b),
    "b transposed view": lambda a, b: (a, mx.contiguous(b.T).T),
    "a transposed view": lambda a, b: (mx.contiguous(a.T).T, b),
    "strided slices": lambda a, b: (
        mx.stack([a, a], axis=-1).reshape(a.shape[0], -1)[:, ::2],
        mx.stack([b, b], axis=1).reshape(-1, b.shape[1])[::2],
    ),
    "bfloat16 inputs": lambda a, b: (a.astype(mx.bfloat16), b.astype(mx.bfloat16).T.T),
    "bfloat16 transposed": lambda a, b: (a.astype(mx.bfloat16), mx.contiguous(b.astype(mx.bfloat16).T).T),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_product_is_float32_matmul_of_the_bfloat16_rounded_inputs(ext, layout: str):
    a, b = _normal((37, 70), 0), _normal((70, 29), 1)
    x, y = LAYOUTS[layout](a, b)
    got = ext.matmul(x, y)
    assert got.dtype == mx.float32 and got.shape == (37, 29)
    want = _rounded(a) @ _rounded(b)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-4)
    # ... and so float32's own product to bfloat16's rounding of the inputs (2^-8 each), not exactly it.
    exact = np.array(a @ b)
    err = np.abs(np.array(got) - exact).max() / np.abs(exact).max()
    assert 1e-5 < err < 2e-2, err


@pytest.mark.parametrize("compiled", [False, True])
def test_both_gradients_are_the_transposed_products(ext, compiled: bool):
    a, b, g = _normal((24, 40), 2), _normal((40, 16), 3), _normal((24, 16), 4)

    def loss(x: mx.array, y: mx.array) -> mx.array:
        return (ext.matmul(x, y.T.T) * g).sum()

    grad = mx.grad(loss, argnums=(0, 1))
    da, db = (mx.compile(grad) if compiled else grad)(a, b)
    assert da.dtype == db.dtype == mx.float32
    np.testing.assert_allclose(np.array(da), np.array(_rounded(g) @ _rounded(b).T), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(db), np.array(_rounded(a).T @ _rounded(g)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(da), np.array(g @ b.T), rtol=0, atol=0.05 * np.abs(np.array(g @ b.T)).max())


def test_a_bfloat16_input_gets_a_bfloat16_gradient(ext):
    a, b = _normal((8, 12), 5).astype(mx.bfloat16), _normal((12, 4), 6)
    da = mx.grad(lambda x: ext.matmul(x, b).sum())(a)
    assert da.dtype == mx.bfloat16


def test_bad_operands_are_refused_when_the_graph_is_built(ext):
    with pytest.raises(ValueError, match="K"):
        ext.matmul(mx.zeros((3, 4)), mx.zeros((5, 2)))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ext.matmul(mx.zeros((3, 4), mx.int32), mx.zeros((4, 2)))


def _fake_speed(monkeypatch, bf16: float, fp32: float) -> None:
    def measure(module, shape=bf16matmul.SHAPE):
        return {"bfloat16_gflops": bf16, "float32_gflops": fp32}

    monkeypatch.setattr(bf16matmul, "measure", measure)


def test_without_the_extension_bfloat16_computes_in_float32_with_one_line(fresh_choice, monkeypatch):
    monkeypatch.setattr(bf16build, "load", lambda: (None, "the bfloat16 GEMM extension is built on Linux x86-64 only"))
    dtype, why = compute_dtype("bfloat16", "cpu")
    assert dtype == "float32" and "Linux x86-64 only" in why and "\n" not in why and FORCE_ENV in why
    assert not bf16matmul.chosen() and ops.param_dtype(mx.bfloat16) == mx.bfloat16


def test_a_failing_extension_keeps_float32_with_one_line(fresh_choice, monkeypatch):
    """A module that builds and loads but whose product raises (oneDNN finds no bfloat16 matmul for the CPU):
    the run computes in float32 and says why in one line, never a traceback."""

    class NoPrimitive:
        def set_threads(self, n: int) -> None:
            pass

        def matmul(self, a, b):
            raise RuntimeError("could not create a primitive descriptor for a matmul primitive")

    monkeypatch.setattr(bf16build, "load", lambda: (NoPrimitive(), None))
    dtype, why = compute_dtype("bfloat16", "cpu")
    assert dtype == "float32" and "\n" not in why and "primitive descriptor" in why and FORCE_ENV in why
    assert not bf16matmul.chosen() and ops.param_dtype(mx.bfloat16) == mx.bfloat16


def test_without_onednn_bfloat16_computes_in_float32_with_one_line(fresh_choice, monkeypatch, tmp_path):
    """oneDNN's wheels not installed: no build is tried, and the run says so in one line."""
    monkeypatch.setattr(bf16build, "_installed", lambda dist, name: None)
    bf16build.onednn.cache_clear()
    bf16build.load.cache_clear()
    try:
        dtype, why = compute_dtype("bfloat16", "cpu")
    finally:
        bf16build.onednn.cache_clear()
        bf16build.load.cache_clear()
    assert dtype == "float32" and "\n" not in why and FORCE_ENV in why
    assert "oneDNN is not installed" in why or "Linux x86-64 only" in why
    assert not (tmp_path / "bf16gemm").exists() or not any((tmp_path / "bf16gemm").iterdir())


def test_info_tells_what_bfloat16_gets_from_the_cache_without_building(ext, fresh_choice, monkeypatch, tmp_path):
    """`mlxllm info`'s line follows the cached measurement; with nothing built it builds nothing."""
    monkeypatch.setattr(bf16build, "build", lambda where: pytest.fail("describe() must not build"))
    monkeypatch.setattr(bf16build, "load", lambda: (ext, None))  # choose() below: the module built already
    assert "first run with train.dtype = bfloat16" in bf16matmul.describe()  # the empty cache has no module
    monkeypatch.setattr(bf16build, "built", lambda: True)
    assert "measures" in bf16matmul.describe()
    _fake_speed(monkeypatch, bf16=80.0, fp32=90.0)
    bf16matmul.choose()
    slow = bf16matmul.describe()
    assert slow.startswith("float32") and "80 against 90 GFLOP/s" in slow
    bf16matmul.choose.cache_clear()
    (tmp_path / "bf16gemm.json").unlink()
    _fake_speed(monkeypatch, bf16=600.0, fp32=90.0)
    bf16matmul.choose()
    assert "through oneDNN" in bf16matmul.describe() and "600 against 90" in bf16matmul.describe()


def test_the_primitives_are_made_once_per_shape_and_agree_across_shapes(ext):
    """A step's shapes over and over (the primitive cache), big enough for oneDNN's blocked kernels."""
    for m, k, n in [(512, 256, 1024), (512, 1024, 256), (512, 256, 1024), (3, 256, 1)]:
        a, w = _normal((m, k), m + k), _normal((n, k), n)
        got = ext.matmul(a, w.T)
        want = _rounded(a) @ _rounded(w).T
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-3)


def test_a_gemm_measured_slower_keeps_float32_with_one_line(ext, fresh_choice, monkeypatch, tmp_path):
    _fake_speed(monkeypatch, bf16=80.0, fp32=90.0)
    dtype, why = compute_dtype("bfloat16", "cpu")
    assert dtype == "float32" and "not faster" in why and "80 against 90 GFLOP/s" in why and "\n" not in why
    assert not bf16matmul.chosen()
    assert list(json.loads((tmp_path / "bf16gemm.json").read_text()).values())[0]["bfloat16_gflops"] == 80.0


def test_a_gemm_measured_faster_keeps_bfloat16_through_the_extension(ext, fresh_choice, monkeypatch):
    _fake_speed(monkeypatch, bf16=600.0, fp32=90.0)
    assert compute_dtype("bfloat16", "cpu") == ("bfloat16", None)
    assert compute_dtype("float16", "cpu")[0] == "float32"  # float16 has no such path
    # Weights stay float32, and only the products inside autocast round their inputs.
    assert ops.param_dtype(mx.bfloat16) == mx.float32 and ops.param_dtype(mx.float32) == mx.float32
    x, w = _normal((6, 64), 7), _normal((32, 64), 8)
    with ops.autocast(mx.bfloat16):
        inside = ops.linear(x, w)
    outside = ops.linear(x, w)
    np.testing.assert_allclose(np.array(inside), np.array(_rounded(x) @ _rounded(w).T), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.array(outside), np.array(x @ w.T))
    assert np.abs(np.array(inside) - np.array(outside)).max() > 1e-4


def test_a_bfloat16_step_trains_on_float32_weights_like_a_float32_step(ext, fresh_choice, monkeypatch):
    _fake_speed(monkeypatch, bf16=600.0, fp32=90.0)
    assert compute_dtype("bfloat16", "cpu")[0] == "bfloat16"
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=2, max_seq_len=32)
    batch = mx.array(np.random.default_rng(0).integers(0, 64, (1, 8, 33)), mx.int32)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = build_model(cfg, seed=0)
        tc = TrainConfig(batch_size=8, seq_len=32, dtype=dtype, grad_checkpoint=dtype == "bfloat16")
        opt = make_optimizer(tc)
        step = make_step(model, opt, tc)
        losses[dtype] = [step(batch)[0].item() for _ in range(3)]
        assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
        assert all(v.dtype == mx.float32 for _, v in tree_flatten(opt.state) if v.ndim > 0)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-2)
    assert losses["bfloat16"] != losses["float32"]  # it did take the bfloat16 products


def test_the_measurement_times_both_products(ext):
    speed = bf16matmul.measure(ext, (256, 128, 256))
    assert speed["bfloat16_gflops"] > 0 and speed["float32_gflops"] > 0


def test_without_cmake_or_a_compiler_a_bfloat16_run_keeps_float32_with_one_line(tmp_path):
    """A machine with no build tools: the choice says so in one line, no traceback, and no build is tried."""
    script = (
        "from mlxllm.cpu.precision import compute_dtype\n"
        "dtype, why = compute_dtype('bfloat16', 'cpu')\n"
        "print(dtype)\nprint(why)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path / "empty"), "MLXLLM_CACHE_DIR": str(tmp_path / "cache")}
    env.pop(FORCE_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    dtype, why = done.stdout.strip().splitlines()
    assert dtype == "float32" and ("cmake is not on PATH" in why or "Linux x86-64 only" in why)
    assert "Traceback" not in done.stderr and done.stderr.strip() == ""
    assert not (tmp_path / "cache" / "bf16gemm").exists() or not any((tmp_path / "cache" / "bf16gemm").iterdir())


def _threads_script(body: str) -> str:
    return (
        "import mlxllm, os\nimport mlx.core as mx\nfrom mlxllm.cpu import bf16build\n"
        "ext, why = bf16build.load()\nassert ext is not None, why\n"
        "a, b = mx.random.normal((256, 256)), mx.random.normal((256, 256))\n" + body
    )


def test_onednn_runs_on_every_core_unless_openmp_is_told(ext, tmp_path):
    """OMP_NUM_THREADS unset: a product runs on every core this process may use; set, on that many."""
    script = _threads_script("mx.eval(ext.matmul(a, b))\nprint(ext.threads(), len(os.sched_getaffinity(0)))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for omp, want in ((None, None), ("1", 1)):
        run_env = env if omp is None else {**env, "OMP_NUM_THREADS": omp}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=run_env, timeout=300)
        assert done.returncode == 0, done.stderr
        ran, cores = map(int, done.stdout.split())
        assert ran == (cores if want is None else want)


def test_each_stream_thread_follows_the_split_thread_count(ext):
    """Split tells oneDNN its share of the cores as it tells the BLAS: every stream thread's product runs on
    that many OpenMP threads, and on OpenMP's own count again once it closes."""
    from mlxllm.cpu.streams import Split, data_streams

    module, _ = bf16build.load()  # the module set_threads tells (an earlier test may have loaded another copy)
    own_before = bf16matmul.threads()
    a, b = _normal((256, 128), 1), _normal((128, 64), 2)
    want = _rounded(a) @ _rounded(b)
    streams = data_streams(2)
    monkey_chosen = bf16matmul._chosen
    bf16matmul._chosen = True  # set_threads reaches the loaded module only once the path is chosen
    try:
        with Split(2, cores=2):
            assert bf16matmul.threads() == 1
            for s in streams:
                got = module.matmul(a, b, stream=s)
                mx.eval(got)
                assert module.threads() == 1
                np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-3)
        assert bf16matmul.threads() == own_before
        mx.eval(module.matmul(a, b, stream=streams[0]))
        assert module.threads() == len(os.sched_getaffinity(0)) or os.environ.get("OMP_NUM_THREADS")
    finally:
        bf16matmul._chosen = monkey_chosen
        bf16matmul.set_threads(own_before)
