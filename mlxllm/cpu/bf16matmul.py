"""Matrix products in bfloat16 on the CPU, through oneDNN's matmul (the built extension of cpu/bf16build.py).

MLX's own CPU bfloat16 matmul is a plain loop, a few GFLOP/s. oneDNN multiplies bfloat16 matrices into
float32 on the matrix units where the CPU has them (AMX on Intel Xeon) and with AVX512_BF16 elsewhere (AMD
Zen 4 and later): several times the float32 BLAS on either (MKL's own bfloat16 GEMM has no AVX512_BF16
kernel for AMD and is slower than float32 there). A bfloat16 run on the CPU then trains as autocast does:
weights, activations, gradients and AdamW state stay float32, and only the inputs of the layers' matrix
products are rounded to bfloat16 (inside the extension), their products summed in float32.

`choose` decides once per process whether that path is worth it here: the extension built and loaded (with
oneDNN), a tiny product right, and its GEMM measured faster than float32 at a training shape (once per
machine, cached like the attention choice). `mlxllm.ops` opens `products` around a bfloat16 step and
asks `active` in its matmul.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterator

from mlxllm.cpu import bf16build, blas
from mlxllm.device import cache_dir, device_name

import mlx.core as mx

# The measured shape: a training step's token rows times a d_model of 256 into a 1024-wide MLP layer.
SHAPE = (2048, 256, 1024)
# bfloat16 rounds every input, so it must be clearly faster to be chosen, not level within the noise.
MARGIN = 1.15
_chosen = False  # choose() said yes
_on = 0  # products() blocks open
_threads = 0  # the OpenMP threads each product may use; 0: OpenMP's own count (OMP_NUM_THREADS, else every core)


def _seconds(fn, reps: int = 5) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def measure(module, shape: tuple[int, int, int] = SHAPE) -> dict[str, float]:
    """GFLOP/s of the extension's x @ w.T (float32 in, rounded inside, as the model calls it) and of MLX's
    float32 one, each at the width it has here: the BLAS at its own thread count, oneDNN on its own pool."""
    m, k, n = shape
    x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(x, w)
    with mx.stream(mx.cpu):
        bf16 = _seconds(lambda: module.matmul(x, w.T))
        fp32 = _seconds(lambda: x @ w.T)
    flops = 2 * m * k * n
    return {"bfloat16_gflops": flops / bf16 / 1e9, "float32_gflops": flops / fp32 / 1e9}


def _cache_key() -> str:
    return f"{device_name()}|{blas.describe()}|{bf16build.key()}"


def _verdict(speed: dict[str, float]) -> tuple[bool, str]:
    """(whether the measured bfloat16 GEMM is clearly faster than float32, the figures in words)."""
    bf16, fp32 = speed["bfloat16_gflops"], speed["float32_gflops"]
    m, k, n = SHAPE
    return bf16 >= MARGIN * fp32, f"{bf16:.0f} against {fp32:.0f} GFLOP/s in float32 at {m}x{k}x{n}"


def _cache() -> dict[str, dict[str, float]]:
    """The measurements kept in cache_dir()/bf16gemm.json (empty when there are none or it is unreadable)."""
    try:
        cached = json.loads((cache_dir() / "bf16gemm.json").read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _cached_measure(module) -> dict[str, float]:
    """measure(), once per machine, BLAS, MLX and extension (the key), kept in cache_dir()/bf16gemm.json."""
    path = cache_dir() / "bf16gemm.json"
    key, cached = _cache_key(), _cache()
    if key not in cached:
        cached[key] = measure(module)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    return cached[key]


def works(module) -> str | None:
    """Why the extension gives wrong products here (or raises: oneDNN has no bfloat16 matmul for a CPU without
    AVX-512, such as AMD Zen 3), else None."""
    a, b = mx.random.normal((5, 7), key=mx.random.key(0)), mx.random.normal((7, 3), key=mx.random.key(1))
    try:
        with mx.stream(mx.cpu):
            got = module.matmul(a, b)
            err = mx.abs(got - a @ b).max().item()
    except Exception as e:  # a failure of a compiled module is any exception
        return f"the built bfloat16 GEMM extension fails ({type(e).__name__}: {e})"
    return None if err < 0.1 else f"the built bfloat16 GEMM extension computes wrong products (error {err:.3g})"


@functools.cache
def choose() -> tuple[bool, str]:
    """(whether bfloat16 matrix products through oneDNN are the faster path here, the one-line reason)."""
    module, reason = bf16build.load()
    if module is None:
        return False, reason
    module.set_threads(_threads)
    reason = works(module)
    if reason:
        return False, reason
    fast, figures = _verdict(_cached_measure(module))
    if not fast:
        return False, f"oneDNN's bfloat16 matmul is not faster than float32 on this CPU ({figures})"
    global _chosen
    _chosen = True
    return True, f"oneDNN's bfloat16 matmul {module.version()} ({figures})"


def describe() -> str:
    """What a run that asks for bfloat16 on this CPU would compute in, from what is installed, built and
    cached, for `mlxllm info`: it neither builds nor measures."""
    reason = bf16build.unsupported()
    found = bf16build.onednn() if reason is None else reason
    if isinstance(found, str):
        return f"float32 ({found})"
    if not bf16build.built():
        return "decided at the first run with train.dtype = bfloat16 (it builds mlxllm's oneDNN extension, once)"
    speed = _cache().get(_cache_key())
    if speed is None:
        return "decided at the first run with train.dtype = bfloat16 (it measures mlxllm's oneDNN extension, once)"
    fast, figures = _verdict(speed)
    if not fast:
        return f"float32 (oneDNN's bfloat16 matmul is not faster here: {figures})"
    return f"matrix products through oneDNN's bfloat16 matmul, the rest in float32 ({figures})"


def threads() -> int | None:
    """The OpenMP threads each product is told to use (None: OpenMP's own count)."""
    return _threads or None


def set_threads(n: int | None) -> None:
    """Let each product use n threads from now on (None: OpenMP's own count, OMP_NUM_THREADS or else every
    core), as the BLAS is told per MLX stream (cpu/streams.Split): oneDNN runs on GNU OpenMP, where each
    stream thread that calls it leads a team of its own, so untold, several streams' teams oversubscribe."""
    global _threads
    if n is not None and n < 1:
        raise ValueError(f"set_threads takes a count >= 1 or None, not {n}")
    _threads = n or 0
    if _chosen:
        bf16build.load()[0].set_threads(_threads)


def chosen() -> bool:
    """Whether choose() has said yes in this process (it is never called from here: only a run that asks for
    bfloat16 on the CPU builds and measures)."""
    return _chosen


@contextlib.contextmanager
def products() -> Iterator[None]:
    """Within it, the model's matrix products (mlxllm.ops.matmul) run through the extension; choose() must
    have said yes. The switch is read while the model is traced, so a compiled step keeps what it traced."""
    global _on
    if not _chosen:
        raise RuntimeError("the bfloat16 GEMM path has not been chosen (bf16matmul.choose)")
    _on += 1
    try:
        yield
    finally:
        _on -= 1


def active() -> bool:
    """Whether the matrix products on the CPU run through oneDNN's bfloat16 matmul now."""
    return _on > 0


def matmul(x: mx.array, w: mx.array) -> mx.array:
    """x (..., K) @ w (K, N) in float32 from bfloat16 products (w may be a transposed view: it is read where
    it lies)."""
    module, _ = bf16build.load()
    lead = x.shape[:-1]
    out = module.matmul(x.reshape(-1, x.shape[-1]), w)
    return out.reshape(*lead, w.shape[-1])
