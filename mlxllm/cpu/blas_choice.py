"""Which of several CBLAS libraries found on this machine mlxllm loads: the fastest single-threaded fp32
GEMM, measured once per CPU and set of libraries and kept in <cache>/blas.json.

Neither vendor's library wins everywhere: oneMKL trained about 10% faster than Debian's OpenBLAS on an
Intel Xeon (Sapphire Rapids), while on an AMD EPYC OpenBLAS's single-threaded sgemm ran 1.5x MKL's. Each
library is measured in a process of its own (sgemm_probe.py), so the ones not picked are never loaded
into this one. Runs before mlx.core is imported: nothing here may import MLX.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mlxllm.host import cache_dir, cpuinfo

PROBE = Path(__file__).with_name("sgemm_probe.py")
TIMEOUT_S = 30.0  # per library; one that hangs or crashes is skipped
# Training calls the BLAS single-threaded, one call per MLX stream (cpu/streams.py): measured the same way.
PROBE_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_THREADING_LAYER": "SEQUENTIAL",
    "MKL_CBWR": "AUTO",  # as blas.MKL_ENV loads it
    "MKL_NUM_THREADS": "1",
    "BLIS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
# The CPU flags by which a BLAS picks its kernels; with the model name they key the cached choice.
KERNEL_FLAGS = frozenset(
    "avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 "
    "asimd sve sve2 sme".split()
)

Measure = Callable[[str], "float | None"]  # a library's path -> its GFLOP/s, or None where it failed


def cache_path() -> Path:
    return cache_dir() / "blas.json"


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cache_key(paths: list[str]) -> str:
    """The CPU (model and kernel-selecting flags) and the libraries (real path and size: an upgrade
    measures again) that a measured choice holds for."""
    flags = set((cpuinfo("flags") or cpuinfo("Features") or "").split()) & KERNEL_FLAGS
    libs = []
    for path in paths:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        libs.append(f"{os.path.realpath(path)}:{size}")
    return f"{cpu_model()}|{' '.join(sorted(flags))}|{';'.join(libs)}"


def measure(path: str, timeout: float = TIMEOUT_S) -> float | None:
    """Single-threaded sgemm GFLOP/s of the library at `path`, measured in a child process (about a
    quarter of a second); None where it cannot be loaded, lacks cblas_sgemm, crashes or times out."""
    env = {**os.environ, **PROBE_ENV}
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-S", str(PROBE), path], capture_output=True, text=True, env=env, timeout=timeout
        )
        value = float(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.split() else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def pick(gflops: dict[str, float | None], order: list[str]) -> str:
    """The path of the fastest measured library (the earlier in `order` on a tie); with no measurement
    that succeeded, the first in `order`."""
    rates = {p: g for p, g in gflops.items() if g is not None and g > 0}
    if not rates:
        return order[0]
    return max((p for p in order if p in rates), key=lambda p: (rates[p], -order.index(p)))


def _label(path: str, paths: list[str]) -> str:
    """'OpenBLAS', 'MKL' or 'BLIS' by the file's name; the path where two share a name."""
    name = os.path.basename(path).lower()
    kind = next((k for key, k in (("openblas", "OpenBLAS"), ("mkl", "MKL"), ("blis", "BLIS")) if key in name), None)
    same = [p for p in paths if kind and kind.lower() in os.path.basename(p).lower()]
    return kind if kind and len(same) == 1 else path


@dataclass(frozen=True)
class Choice:
    """The library to load, with what decided it."""

    path: str
    gflops: dict[str, float | None]  # by candidate path, in the order searched; None: its measurement failed
    cpu: str  # the CPU's model name
    cache: Path  # the cache file read or written
    status: str  # 'measured' (now, and cached), 'cached' (read from the cache), else why it is not cached

    def describe(self) -> str:
        """Why this library, e.g. 'measured: OpenBLAS 147 GFLOP/s, MKL 66 GFLOP/s ... on <cpu>, cached in ...'."""
        paths = list(self.gflops)
        figures = ", ".join(
            f"{_label(p, paths)} {g:,.0f} GFLOP/s" if g else f"{_label(p, paths)} failed"
            for p, g in self.gflops.items()
        )
        if not any(self.gflops.values()):
            return f"no measurement succeeded ({figures}), so the first found"
        where = {"measured": f"cached in {self.cache}", "cached": f"read from {self.cache}"}
        tail = where.get(self.status, f"not cached: {self.status}")
        return f"measured (single-threaded sgemm, as training calls it): {figures} on {self.cpu}, {tail}"


def _read(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(cache: Path, key: str, paths: list[str]) -> dict[str, float | None] | None:
    """The figures recorded under `key` for exactly `paths`, or None where there are none (or they are
    not what this module writes)."""
    entry = _read(cache).get(key)
    gflops = entry.get("gflops") if isinstance(entry, dict) else None
    if not isinstance(gflops, dict) or set(gflops) != set(paths):
        return None
    ok = all(g is None or (isinstance(g, (int, float)) and g > 0) for g in gflops.values())
    return {p: gflops[p] for p in paths} if ok else None


def _write(cache: Path, key: str, gflops: dict[str, float | None], choice: str) -> str:
    """Record the figures under `key`: 'measured', or why they could not be written."""
    data = _read(cache)
    data[key] = {"choice": choice, "gflops": gflops}
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(cache)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return "measured"


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Hold <cache>.lock, so that the processes of a training group starting together measure once, not
    against each other; without it (a read-only cache directory) each measures."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.with_suffix(".lock"), "a")
    except OSError:
        yield
        return
    import fcntl  # POSIX only, as the search for a BLAS is (Linux)

    with lock:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def choose(paths: list[str], measure: Measure = measure, cache: Path | None = None) -> Choice:
    """Which of `paths` (distinct libraries, in the order searched) to load: the recorded choice for this
    CPU and these libraries, else each measured by `measure` and the fastest recorded. cache: the file
    (default: <cache dir>/blas.json); one that cannot be read or written costs only the measurement."""
    cache = cache or cache_path()
    key = cache_key(paths)
    with _locked(cache):
        gflops = _cached(cache, key, paths)
        status = "cached"
        if gflops is None:
            gflops = {p: measure(p) for p in paths}
            status = _write(cache, key, gflops, pick(gflops, paths)) if any(gflops.values()) else "nothing measured"
    return Choice(pick(gflops, paths), gflops, cpu_model(), cache, status)
