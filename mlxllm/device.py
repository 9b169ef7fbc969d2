"""This machine: which device MLX runs on, its name and facts, its cores, its peak matmul FLOP/s
(for model FLOPs utilisation), and mlxllm's cache directory (read in host.py, which needs no MLX)."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import time
from typing import Any

from mlxllm.cpu import blas
from mlxllm.distributed import current
from mlxllm.host import cache_dir
from mlxllm.host import cpuinfo as _cpuinfo

import mlx.core as mx

# Apple GPU peak FP32 TFLOP/s by chip (Apple's figures for the largest GPU of each chip; bf16/fp16 run
# at the same rate on these GPUs). Looked up by the chip name the system reports.
APPLE_FP32_TFLOPS = {
    "M1": 2.6,
    "M1 Pro": 5.3,
    "M1 Max": 10.6,
    "M1 Ultra": 21.2,
    "M2": 3.6,
    "M2 Pro": 6.8,
    "M2 Max": 13.6,
    "M2 Ultra": 27.2,
    "M3": 4.1,
    "M3 Pro": 7.4,
    "M3 Max": 16.4,
    "M3 Ultra": 28.2,
    "M4": 4.3,
    "M4 Pro": 9.2,
    "M4 Max": 18.4,
}
# NVIDIA dense (not sparse) peak TFLOP/s: (fp32, tf32, bf16/fp16 with fp32 accumulation). MLX computes fp32
# matmuls in TF32 on CUDA unless MLX_ENABLE_TF32=0 (cublas_gemm.cpp), so that is the fp32 peak by default.
# Matched as whole words of the device's name, the longest first ("A10" is not the A10G, whose tensor rate
# NVIDIA does not publish: a GPU not listed is measured instead).
CUDA_TFLOPS = {
    "H200": (67.0, 494.7, 989.4),
    "H100 PCIe": (51.2, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "L40S": (91.6, 183.0, 362.1),
    "RTX 4090": (82.6, 82.6, 165.2),
    "A10": (31.2, 62.5, 125.0),
}


def machine_cores() -> int:
    """The cores this process may run on (its affinity), shared with any other process of its group here."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def usable_cores() -> int:
    """This process's cores: its share where several processes of a training group run on this machine."""
    return max(1, machine_cores() // current().local_size)


def backend() -> str:
    """'cpu', 'metal' or 'cuda': where MLX runs by default."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


@functools.cache
def _gpu_info() -> dict[str, Any]:
    try:
        return dict(mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info())
    except Exception:  # noqa: BLE001 - an older MLX or a missing field: callers treat every key as optional
        return {}


def info() -> dict[str, Any]:
    """MLX's facts about the default GPU (name, memory sizes); empty on the CPU."""
    return {} if backend() == "cpu" else _gpu_info()


def device_name() -> str:
    """e.g. 'cpu:x86_64:AMD EPYC' or 'metal:Apple M2 Max'."""
    kind = backend()
    if kind == "cpu":
        return f"cpu:{platform.machine()}:{platform.processor() or _cpu_model()}"
    return f"{kind}:{info().get('device_name', 'gpu')}"


@functools.cache
def _cpu_model() -> str:
    return _cpuinfo("model name") or _apple_chip() or platform.processor() or "unknown"


# fp32 lanes of one vector FMA, by the widest SIMD the CPU reports.
_SIMD_LANES = (("avx512f", "AVX-512", 16), ("avx2", "AVX2", 8), ("sse2", "SSE2", 4))


def cpu_facts() -> dict[str, Any]:
    """The CPU's model, SIMD level, cores, clock and theoretical fp32 peak (cores x 2 FMA units x lanes
    x 2 FLOPs x clock; None where the clock or the SIMD level cannot be read)."""
    flags = set((_cpuinfo("flags") or "").split())
    simd, lanes = next(((name, n) for flag, name, n in _SIMD_LANES if flag in flags), (None, None))
    if simd is None and platform.machine() in ("arm64", "aarch64"):
        simd, lanes = "NEON", 4
    mhz = _cpuinfo("cpu MHz")
    ghz = float(mhz) / 1000 if mhz else None
    cores, has_fma = machine_cores(), "fma" in flags or simd == "NEON"
    peak = cores * 2 * lanes * 2 * ghz * 1e9 if lanes and ghz and has_fma else None
    return {"model": _cpu_model(), "simd": simd or "unknown", "cores": cores, "ghz": ghz, "theoretical_peak": peak}


def describe_cpu() -> str:
    f = cpu_facts()
    clock = f"{f['ghz']:.2f} GHz" if f["ghz"] else "clock unknown"
    peak = f", theoretical fp32 peak {f['theoretical_peak'] / 1e9:,.0f} GFLOP/s" if f["theoretical_peak"] else ""
    return f"{f['model']} ({f['simd']}, {f['cores']} cores, {clock}{peak})"


def _apple_chip() -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
        return out.stdout.replace("Apple", "").strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def measure_matmul_flops(n: int = 1024, dtype: mx.Dtype = mx.float32, seconds: float = 0.5) -> float:
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    # The best of short bursts, not the mean: on a shared machine a mean measures what other processes
    # left over, which would inflate every MFU figure computed from it.
    best, reps, start = 0.0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 5:
        t = time.perf_counter()
        for _ in range(3):
            mx.eval(a @ b)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t))
        reps += 1
    return best


def tf32_enabled() -> bool:
    """Whether MLX's CUDA backend runs fp32 matmuls in TF32: MLX_ENABLE_TF32, an integer, 1 by default."""
    try:
        return int(os.environ.get("MLX_ENABLE_TF32", "1")) != 0
    except ValueError:
        return True


def cuda_peak(name: str, dtype: str, tf32: bool = True) -> tuple[float, str] | None:
    """(peak FLOP/s, source) of the NVIDIA GPU called `name` (e.g. 'cuda:NVIDIA A100-SXM4-80GB') for matmuls
    in `dtype`, fp32 ones in TF32 when `tf32`; None for a GPU not in CUDA_TFLOPS."""
    for key in sorted(CUDA_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", name):
            fp32, tf32_peak, half = CUDA_TFLOPS[key]
            if dtype != "float32":
                return half * 1e12, f"NVIDIA {key} spec ({dtype})"
            return (tf32_peak * 1e12, f"NVIDIA {key} spec (TF32)") if tf32 else (fp32 * 1e12, f"NVIDIA {key} spec")
    return None


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from). Measured once per device and cached on CPU."""
    kind = backend()
    if kind == "metal":
        chip = _apple_chip() or ""
        # Longest name first so "M3 Max" is not read as "M3".
        for name in sorted(APPLE_FP32_TFLOPS, key=len, reverse=True):
            if chip.startswith(name):
                return APPLE_FP32_TFLOPS[name] * 1e12, f"Apple {name} GPU spec"
    if kind == "cuda":
        spec = cuda_peak(device_name(), dtype, tf32_enabled())
        if spec is not None:
            return spec
    path = cache_dir() / "peak_flops.json"
    key = f"{device_name()}|{blas.which()}|{dtype}"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure_matmul_flops(dtype=getattr(mx, dtype))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    theory = cpu_facts()["theoretical_peak"] if kind == "cpu" else None
    # MFU is against what the machine can do, not what the BLAS in use does: a slow BLAS (or a
    # single-threaded one) must not make its own slowness look like full use.
    if theory and theory > cached[key]:
        return theory, "theoretical (cores x FMA width x clock)"
    return cached[key], "measured 1024x1024 matmul"
