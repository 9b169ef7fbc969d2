"""Load an optimized CBLAS before `mlx.core` on Linux.

MLX's Linux wheel links a reference BLAS (~6 GFLOP/s for a 1024^2 fp32 matmul). Its `cblas_*`
symbols are resolved lazily, so a library exporting the same symbols, loaded with RTLD_GLOBAL
before `mlx.core` is imported, takes their place (~30x faster). The libraries searched are a system
OpenBLAS, Intel's oneMKL (which pip installs with mlxllm on Linux x86_64) and BLIS; where more than one
is found, the faster on this machine is loaded (blas_choice.py measures them once and caches the
choice). macOS uses Accelerate and Metal and is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxllm.cpu.blas_choice import Choice

# Searched in order (the first is loaded where measurements cannot tell); MLXLLM_BLAS (a path, or "none")
# overrides the search.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "libopenblas.so.0",
    # The `mkl` wheel puts libmkl_rt in <prefix>/lib, which is not on the loader's path.
    os.path.join(sys.prefix, "lib", "libmkl_rt.so.3"),
    os.path.join(sys.prefix, "lib", "libmkl_rt.so.2"),
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "libblis.so.4",
)

HINT = (
    "Only MLX's reference BLAS is in use, so matmuls run about 30x slower and training takes about 20x "
    "longer (the quick start: about 45 minutes instead of 2). Fix it with `pip install mkl` (Linux x86_64, "
    "no root needed), `sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu) or `sudo dnf install "
    "openblas` (Fedora), or point MLXLLM_BLAS at any library exporting the standard cblas_* symbols."
)

loaded: str | None = None  # path of the BLAS we loaded, if any
why: str | None = None  # why that one: set by MLXLLM_BLAS, the only one found, or measured
late = False  # True when mlx.core was imported before we could load one

# Thread settings applied before the library is loaded (OpenBLAS reads them once, when it is loaded);
# a value already in the environment wins. By default OpenBLAS's idle worker threads busy-wait for
# about 0.1 s after each call. A training step calls sgemm hundreds of times with MLX's own
# single-threaded elementwise work in between, so spinning workers would take a core from MLX's
# stream threads whenever the machine has anything else to run; 2**4 cycles makes them sleep at once.
THREAD_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}
# How MKL is loaded, unless the environment says otherwise. Sequential: the training step runs one BLAS call
# per stream, a stream per core (see streams.py), and MKL's own thread pools would only compete with those.
# Conditional numerical reproducibility (CNR), AUTO: without it MKL may pick a kernel by the buffers'
# alignment, so the same product can differ in the last bit between two processes, and a resumed run would
# not continue bit-exactly.
MKL_ENV = {"MKL_THREADING_LAYER": "SEQUENTIAL", "MKL_CBWR": "AUTO"}


def _try(path: str) -> bool:
    global loaded
    if "mkl_rt" in path:
        for key, value in MKL_ENV.items():
            os.environ.setdefault(key, value)
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cblas_sgemm  # noqa: B018 - must export the standard symbols
    except (OSError, AttributeError):
        return False
    loaded = path
    return True


def setup() -> None:
    """Load an optimized BLAS: MLXLLM_BLAS's, else the only one found, else the fastest of those found
    (blas_choice.choose); a no-op off Linux or when done already."""
    global late, why
    if not sys.platform.startswith("linux") or loaded is not None:
        return
    if "mlx.core" in sys.modules:
        late = True
        return
    choice = os.environ.get("MLXLLM_BLAS", "")
    if choice.lower() == "none":
        return
    for key, value in THREAD_ENV.items():
        os.environ.setdefault(key, value)
    if choice:
        why = "set by MLXLLM_BLAS" if _try(choice) else None
        return
    by_loader = ctypes.util.find_library("openblas")
    names = (*CANDIDATES, *([by_loader] if by_loader else []))
    found = locate(names)
    picked = _choose(found) if len(found) > 1 else None
    for path in (*([picked.path] if picked else []), *found, *names):
        if _try(path):
            if picked and path == picked.path:
                why = picked.describe()
            else:
                why = "the only one found" if found == [path] else "the first of those searched that loads"
            return


def _search_dirs() -> list[str]:
    """Where the loader finds a library named without a directory, as far as it can be known without it."""
    arch = f"{platform.machine()}-linux-gnu"
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    return [*dirs, f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/local/lib", "/usr/lib64", "/usr/lib", "/lib64", "/lib"]


def locate(names: Iterable[str]) -> list[str]:
    """The files among `names` (paths, or bare library names looked up in the loader's usual directories)
    that exist, one per distinct library (by real path), in the order given."""
    found, seen = [], set()
    for name in names:
        paths = [name] if os.sep in name else [os.path.join(d, name) for d in _search_dirs()]
        path = next((p for p in paths if os.path.isfile(p)), None)
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append(path)
    return found


def _choose(found: list[str]) -> Choice:
    """blas_choice.choose(found), imported only where it is needed: with one library found, this module
    needs nothing of mlxllm (tests/test_platform.py runs its search alone)."""
    from mlxllm.cpu import blas_choice

    return blas_choice.choose(found)


def warning(backend: str = "cpu") -> str | None:
    """What to tell the user loudly when only the reference BLAS is in use (on Linux), else None.
    backend: where MLX computes (device.backend()); on a GPU (CUDA: cuBLAS) the CPU's BLAS does no training."""
    if not sys.platform.startswith("linux") or loaded or backend != "cpu":
        return None
    return describe() + ". " + HINT


def describe() -> str:
    """One line on which BLAS the CPU backend uses, and why that one."""
    return f"{which()} ({why})" if loaded and why else which()


def which() -> str:
    """Which BLAS the CPU backend uses (a key of measurements made with it)."""
    if not sys.platform.startswith("linux"):
        return "Apple Accelerate (macOS)" if sys.platform == "darwin" else "MLX's bundled BLAS"
    if loaded:
        return f"optimized CBLAS loaded from {loaded}"
    if late:
        return "MLX's reference BLAS (mlx.core was imported before mlxllm, so none could be loaded)"
    if os.environ.get("MLXLLM_BLAS", "").lower() == "none":
        return "MLX's reference BLAS (MLXLLM_BLAS=none)"
    return "MLX's reference BLAS (no optimized BLAS found)"


# (setter, getter) pairs of the BLAS libraries we may load; OpenBLAS's setter works at any time.
_THREAD_API = (
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)


@functools.cache
def _thread_api(path: str) -> tuple | None:
    """The (setter, getter) of the library at path, looked up once."""
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    for setter, getter in _THREAD_API:
        if hasattr(lib, setter) and hasattr(lib, getter):
            return getattr(lib, setter), getattr(lib, getter)
    return None


def threads() -> int | None:
    """Threads each BLAS call may use: 1 for MLX's own (single-threaded) BLAS, None if unknown."""
    if not sys.platform.startswith("linux"):
        return None
    if not loaded:
        return 1
    api = _thread_api(loaded)
    return int(api[1]()) if api else None


def set_threads(n: int) -> bool:
    """Let each BLAS call use n threads; False when the BLAS in use cannot be told."""
    if not sys.platform.startswith("linux"):
        return False
    if not loaded:
        return n == 1  # MLX's own BLAS is single-threaded
    api = _thread_api(loaded)
    if api is None:
        return False
    api[0](int(n))
    return True
