"""Speed set-up: BLAS thread settings, no recompiles, memory estimate and check, the benchmark's PyTorch model.

The training benchmark itself: tests/test_bench.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from mlxllm import step as step_mod
from mlxllm.config import ModelConfig, TrainConfig
from mlxllm.cpu import blas as _blas
from mlxllm.cpu import blas_choice, fastexp
from mlxllm.cpu.startup import BFS_WIDTH
from mlxllm.errors import MlxllmError
from mlxllm.model import build_model
from mlxllm.schedule import lr_at
from mlxllm.step import stream_count

import mlx.core as mx
import numpy as np
import pytest

linux_openblas = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and _blas.loaded and "openblas" in _blas.loaded),
    reason="needs OpenBLAS preloaded on Linux",
)


def _python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@linux_openblas
def test_blas_setup_sets_thread_timeout_before_loading():
    code = "import os, mlxllm; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert _python(code) == "4"
    # The user's own setting wins and is left alone.
    assert _python(code, OPENBLAS_THREAD_TIMEOUT="12") == "12"


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="set only on Linux, where the step is split over streams"
)
def test_import_widens_mlx_graph_walk_unless_the_user_set_it():
    """Importing mlxllm sets MLX_BFS_MAX_WIDTH before MLX's first evaluation (see cpu.streams.BFS_WIDTH)."""
    code = "import os, mlxllm; print(os.environ['MLX_BFS_MAX_WIDTH'])"
    clean = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    run = lambda **env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=120,
    ).stdout.strip()
    assert run() == BFS_WIDTH
    assert run(MLX_BFS_MAX_WIDTH="33") == "33"


def test_import_sets_only_what_mlx_reads_before_its_first_use():
    code = "import os; before = set(os.environ); import mlxllm; print(' '.join(sorted(set(os.environ) - before)))"
    allowed = {"OPENBLAS_THREAD_TIMEOUT", "MKL_THREADING_LAYER", "MKL_CBWR", "MLX_BFS_MAX_WIDTH"}
    assert set(_python(code).split()) <= allowed


MKL = os.path.join(sys.prefix, "lib", "libmkl_rt.so.3")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists(MKL)), reason="pip's MKL is Linux x86-64")
def test_mkl_loads_sequential_and_reproducible_unless_the_environment_says_otherwise():
    """MKL's conditional numerical reproducibility: else a product may differ in its last bit between the
    process that trained and the one that resumes (the buffers' alignment picks the kernel)."""
    code = "import os, mlxllm; print(os.environ['MKL_CBWR'], os.environ['MKL_THREADING_LAYER'])"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MKL_")}
    run = lambda **env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, timeout=120
    ).stdout.split()
    assert run(MLXLLM_BLAS=MKL) == ["AUTO", "SEQUENTIAL"]
    assert run(MLXLLM_BLAS=MKL, MKL_CBWR="COMPATIBLE") == ["COMPATIBLE", "SEQUENTIAL"]
    assert _blas.MKL_ENV.items() <= blas_choice.PROBE_ENV.items()  # the BLAS choice measures MKL as it loads


_WIDE_GRAPH = (
    "xs = [mx.full((1 << 18,), float(i)) for i in range(64)]\n"
    "mx.eval(xs); mx.reset_peak_memory(); base = mx.get_active_memory()\n"
    "outs = []\n"
    "for x in xs:\n"
    "    for _ in range(6):\n"
    "        x = mx.sin(x) * 1.01\n"
    "    outs.append(x.sum())\n"
    "mx.eval(sum(outs)); print(mx.get_peak_memory() - base)\n"
)


def test_mlx_reads_its_graph_walk_width_at_its_first_evaluation_only():
    """Why mlxllm sets MLX_BFS_MAX_WIDTH when imported: MLX reads it once, at the first evaluation of
    the process (whoever makes it), so that is the last moment to set it. A width of 1 walks this
    graph of 64 independent chains depth-first, one chain alive at a time: less peak memory."""
    clean = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}

    def peak(before_first_eval: bool) -> int:
        setting = "os.environ['MLX_BFS_MAX_WIDTH'] = '1'\n"
        code = "import os\nimport mlx.core as mx\n"
        code += (
            setting + "mx.eval(mx.array(1.0) + 1)\n" if before_first_eval else "mx.eval(mx.array(1.0) + 1)\n" + setting
        )
        out = subprocess.run(
            [sys.executable, "-c", code + _WIDE_GRAPH], capture_output=True, text=True, env=clean, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    narrow, too_late = peak(True), peak(False)
    assert narrow * 2 < too_late


@linux_openblas
def test_a_blas_loaded_after_mlx_core_is_never_called():
    """Why mlxllm loads its BLAS when imported, before mlx.core: loaded after `import mlx.core`, even
    before the first matmul, MLX does not call it."""
    code = (
        "import ctypes, os, sys, time\n"
        "first = sys.argv[1] == 'before'\n"
        f"load = lambda: ctypes.CDLL({_blas.loaded!r}, mode=ctypes.RTLD_GLOBAL)\n"
        "first and load()\n"
        "import mlx.core as mx\n"
        "first or load()\n"
        "a = mx.random.normal((1024, 1024)); mx.eval(a @ a)\n"
        "def once():\n"
        "    t = time.perf_counter(); mx.eval(a @ a); return time.perf_counter() - t\n"
        "print(min(once() for _ in range(3)))\n"
    )

    def seconds(when: str) -> float:
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", code, when], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    assert seconds("before") * 5 < seconds("after")


@linux_openblas
def test_idle_blas_threads_do_not_spin():
    """OpenBLAS's default leaves its workers busy-waiting ~0.1 s after every call; ours sleep at once."""
    code = (
        "import time, mlxllm, mlx.core as mx\n"
        "a = mx.random.normal((512, 512)); mx.eval(a)\n"
        "burnt = 0.0\n"
        "for _ in range(3):\n"
        "    mx.eval(a @ a); c = time.process_time(); time.sleep(0.2); burnt += time.process_time() - c\n"
        "print(burnt / 3)\n"
    )
    assert float(_python(code)) < 0.02


def _counting_step(monkeypatch, compile: bool = True, shapes: tuple[int, ...] = (17,) * 5) -> int:
    """loss_fn calls over steps on batches of (1, 2, T + 1) for each T + 1 in `shapes`."""
    traces = []
    real = step_mod.loss_fn
    monkeypatch.setattr(step_mod, "loss_fn", lambda model, batch: traces.append(1) or real(model, batch))
    mc = ModelConfig(vocab_size=32, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)
    tc = TrainConfig(batch_size=2, seq_len=16, warmup_steps=2, compile=compile)
    model = build_model(mc)
    opt = step_mod.make_optimizer(tc)
    opt.init(model.trainable_parameters())
    step = step_mod.make_step(model, opt, tc)
    rng = np.random.default_rng(0)
    for i, width in enumerate(shapes):
        opt.learning_rate = lr_at(tc, i, i / len(shapes))  # changes every step, as in training
        loss, _ = step(mx.array(rng.integers(0, 32, (1, 2, width), dtype=np.int32)))
        mx.async_eval(loss, model.parameters(), opt.state)
    mx.eval(loss)
    return len(traces)


def test_compiled_step_traces_once(monkeypatch):
    # One trace calls loss_fn once per stream the batch is split over.
    mc = ModelConfig(vocab_size=32, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)
    per_trace = stream_count(TrainConfig(batch_size=2, seq_len=16), mc)
    assert _counting_step(monkeypatch, compile=True) == per_trace


def test_compiled_step_retraces_for_a_new_shape_only(monkeypatch):
    """What the benchmark's recompile count and the no-recompile guarantee rest on: the compiled step
    traces again when the batch shape changes (here a shorter sequence), once per new shape, and an
    earlier shape reuses its trace."""
    mc = ModelConfig(vocab_size=32, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)
    per_trace = stream_count(TrainConfig(batch_size=2, seq_len=16), mc)
    assert _counting_step(monkeypatch, compile=True, shapes=(17, 17, 9, 9, 17, 9)) == 2 * per_trace


def test_memory_estimate_parts_and_scaling():
    from mlxllm.memory import estimate_memory

    mc = ModelConfig(vocab_size=65, n_layers=4, d_model=256, n_heads=4, max_seq_len=256)
    est = estimate_memory(mc, 16, 256, "float32")
    assert est["total"] == pytest.approx(est["weights"] + est["gradients"] + est["optimizer"] + est["activations"])
    assert est["weights"] == 4 * mc.num_params() and est["optimizer"] == 2 * est["weights"]
    double = estimate_memory(mc, 32, 256, "float32")
    assert double["activations"] == pytest.approx(2 * est["activations"])
    half = estimate_memory(mc, 16, 256, "bfloat16")
    assert half["activations"] < est["activations"] and half["weights"] > est["weights"]  # + the bf16 copy
    # Close to what the compiled step really peaks at (measured 665 MiB for this config on Linux).
    assert 500 * 2**20 < est["total"] < 800 * 2**20


def test_memory_estimate_matches_a_measured_step():
    from mlxllm.memory import estimate_memory

    mc = ModelConfig(vocab_size=65, n_layers=2, d_model=128, n_heads=4, max_seq_len=128)
    tc = TrainConfig(batch_size=8, seq_len=128)
    model = build_model(mc)
    opt = step_mod.make_optimizer(tc)
    opt.init(model.trainable_parameters())
    step = step_mod.make_step(model, opt, tc)
    batch = mx.array(np.random.default_rng(0).integers(0, 65, (1, 8, 129), dtype=np.int32))
    mx.eval(step(batch))
    mx.reset_peak_memory()
    for _ in range(2):
        loss, _ = step(batch)
        mx.eval(loss, model.parameters(), opt.state)
    measured = mx.get_peak_memory()
    est = estimate_memory(mc, 8, 128, "float32")["total"]
    assert 0.6 < est / measured < 1.6, (est, measured)


def test_check_fits_refuses_with_a_suggestion(monkeypatch):
    from mlxllm import memory

    def device_with(available):
        monkeypatch.setattr(memory, "device_memory", lambda: (available, "test"))

    mc = ModelConfig(vocab_size=65, n_layers=4, d_model=256, n_heads=4, max_seq_len=256)
    est = memory.estimate_memory(mc, 16, 256, "float32")
    device_with(64 * 2**30)
    memory.check_fits(est, 16, 256)  # fits: no error
    device_with(300 * 2**20)
    with pytest.raises(MlxllmError, match=r"batch_size=\d+ with train.grad_accum=\d+"):
        memory.check_fits(est, 16, 256)
    device_with(10 * 2**20)
    with pytest.raises(MlxllmError, match="smaller model"):
        memory.check_fits(est, 16, 256)


def test_fast_exp_silu_softmax_match_exact():
    import mlx.nn as nn

    x = -mx.linspace(0, 86.999, 100001)
    rel = mx.abs(fastexp.exp_nonpositive(x) - mx.exp(x)) / mx.exp(x)
    assert rel.max().item() < 5e-5 and rel.mean().item() < 1e-5
    a = mx.random.normal((2, 16, 64), key=mx.random.key(0)) * 4
    ct = mx.random.normal(a.shape, key=mx.random.key(1))
    for fast, exact in ((fastexp.silu, nn.silu), (fastexp.softmax, lambda t: mx.softmax(t, axis=-1))):
        fv, fg = mx.compile(mx.value_and_grad(lambda t: (fast(t) * ct).sum()))(a)  # noqa: B023
        ev, eg = mx.value_and_grad(lambda t: (exact(t) * ct).sum())(a)  # noqa: B023
        assert abs(fv.item() - ev.item()) < 1e-4 * max(1.0, abs(ev.item()))
        assert mx.allclose(fg, eg, rtol=1e-4, atol=1e-5).item()
    masked = mx.where(mx.tri(16, 16, 0, dtype=mx.bool_), a[0, :, :16], -mx.inf)
    assert mx.allclose(fastexp.softmax(masked), mx.softmax(masked, axis=-1), atol=1e-6).item()


def _subnormal(a: mx.array) -> int:
    tiny = float(np.finfo(np.float32).tiny)
    return int(((a != 0) & (mx.abs(a.astype(mx.float32)) < tiny)).sum().item())


def test_fast_exp_gives_exact_zeros_not_subnormals():
    """At and below -87 (a masked score is -inf) the fast exp is exactly 0: a tiny nonzero value there
    makes the score gradient e * (dP - delta) subnormal across the masked part of every score matrix,
    which Intel cores process by microcode assists, one per vector operation."""
    from mlxllm.cpu import halves

    x = -mx.linspace(0, 200, 400001)
    for compiled in (False, True):
        e = (mx.compile(fastexp.exp_nonpositive) if compiled else fastexp.exp_nonpositive)(x)
        assert _subnormal(e) == 0
        assert mx.all(mx.where(x <= -87, e, 0) == 0).item() and mx.all(mx.where(x > -86.9, e, 1) > 0).item()
    special = fastexp.exp_nonpositive(mx.array([-mx.inf, float("nan"), 0.0]))
    assert special[0].item() == 0 and math.isnan(special[1].item()) and special[2].item() == pytest.approx(1.0)
    q, k = (mx.random.normal((2, 2, 1, 64, 16), key=mx.random.key(i)) for i in (3, 4))
    e, l = halves._scores_exp(q, k, 0, 0.25)  # noqa: E741
    masked = mx.broadcast_to(mx.triu(mx.ones((64, 64), dtype=mx.bool_), 1), e.shape)
    assert mx.all(mx.where(masked, e, 0) == 0).item()
    assert mx.all(mx.where(masked, 1, e) > 0).item()
    g = mx.random.normal(e.shape, key=mx.random.key(5)) * 1e-2
    assert _subnormal(e) == 0 and _subnormal(e * g * (0.25 / l)) == 0  # the score gradient's product


def test_fast_silu_keeps_dtype_and_matches_on_two_streams():
    """The per-stream constants must not promote bf16 to fp32, and a step split over two streams
    (each with its own constants) computes what one stream does."""
    import mlx.nn as nn

    a = mx.random.normal((4, 64, 128), key=mx.random.key(2)) * 4
    assert a.size // 2 >= fastexp.PER_STREAM_MIN_SIZE  # each stream's half takes the per-stream constants
    half = fastexp.silu(a.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
    assert mx.allclose(half.astype(mx.float32), nn.silu(a), rtol=2e-2, atol=2e-2).item()
    assert fastexp.exp_nonpositive(-mx.abs(a).astype(mx.float16)).dtype == mx.float16

    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]

    def loss(t):
        return (fastexp.silu(t) * fastexp.softmax(t)).sum()

    def split(t):
        outs = []
        for i, s in enumerate(streams):
            with mx.stream(s):
                outs.append(mx.value_and_grad(loss)(t[2 * i : 2 * i + 2]))
        return outs[0][0] + outs[1][0], mx.concatenate([outs[0][1], outs[1][1]])

    v1, g1 = mx.value_and_grad(loss)(a)
    v2, g2 = mx.compile(split)(a)
    assert abs(v1.item() - v2.item()) < 1e-4 * abs(v1.item())
    assert mx.allclose(g1, g2, rtol=1e-5, atol=1e-6).item()


def test_configure_cache_raises_the_cpu_cache_limit(monkeypatch):
    from mlxllm.memory import configure_cache

    before = mx.set_cache_limit(0)
    try:
        mx.set_cache_limit(before)
        if mx.default_device() != mx.cpu:
            assert configure_cache() is None
            return
        assert configure_cache() == mx.get_memory_limit()
        monkeypatch.setenv("MLXLLM_CPU_CACHE_LIMIT", "0")
        assert configure_cache() is None
    finally:
        mx.set_cache_limit(before)


def test_the_pytorch_reference_is_mlxllms_model():
    """The benchmark's PyTorch rows compare like with like: same parameter count and, with mlxllm's
    weights copied in, the same logits."""
    torch = pytest.importorskip("torch", reason="PyTorch (CPU) is not installed; .ci/run installs it")
    from mlxllm.bench.workers import load_torch_reference, model_config

    from mlx.utils import tree_flatten

    ref = load_torch_reference()
    cfg = {"vocab_size": 65, "n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 32, "batch_size": 2}
    mc = model_config(cfg)
    tmodel = ref.make_trainer({**cfg, "hidden_dim": mc.hidden_dim}).model
    assert sum(p.numel() for p in tmodel.parameters()) == mc.num_params()
    ours = build_model(mc, seed=1)
    names = {
        k.replace("model.", "", 1).replace("self_attn.", "").replace("mlp.", ""): v
        for k, v in tree_flatten(ours.parameters())
    }
    with torch.no_grad():
        for name, p in tmodel.named_parameters():
            p.copy_(torch.from_numpy(np.array(names.pop(name))))
    assert not names  # every mlxllm parameter has its PyTorch twin
    ids = np.random.default_rng(0).integers(0, 65, (2, 32))
    with torch.no_grad():
        want = tmodel(torch.from_numpy(ids)).numpy()
    got = np.array(ours(mx.array(ids.astype(np.int32))))
    assert np.abs(got - want).max() < 1e-4
