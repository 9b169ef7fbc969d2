"""The bfloat16 GEMM extension (mlxllm/cpu/bf16gemm/: gemm.cpp and its CMakeLists.txt), built just in time.

pip installs the C++ source as package data and compiles nothing, so an install cannot fail on it. The first
run that asks for bfloat16 on the CPU builds it with cmake, once, into the per-user cache (device.cache_dir),
in a folder keyed by the source, MLX's version and the Python version, and every later run imports the built
module from there. It compiles against oneDNN as pip installs it (the CPU-only, GNU OpenMP build: the
`onednn-cpu-gomp` wheel's libdnnl.so.3 and the `onednn-devel-cpu-gomp` wheel's headers, `pip install
'mlxllm[cpu-bf16]'`), found through their installed files, and links it with a search path to where it lies.
Whatever is missing (Linux x86_64, oneDNN, cmake, a C++ compiler, nanobind, Python's headers) makes `load` say
why in one line, and the run keeps the float32 path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from mlxllm.device import cache_dir

SOURCE = Path(__file__).with_name("bf16gemm")
MODULE = "_bf16gemm"
BUILD_SECONDS = 900  # configure and compile, each; a loaded 2-core machine takes about a minute in all
_LOG = "build.log"


def unsupported() -> str | None:
    """Why this machine cannot have the extension at all (oneDNN's wheels are x86-64 Linux ones here; macOS
    has Accelerate and Metal), else None."""
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return (
            f"the bfloat16 GEMM extension is built on Linux x86-64 only (this is {sys.platform} {platform.machine()})"
        )
    return None


def _mlx_cmake_dir() -> Path:
    import mlx.core as mx

    return Path(mx.__file__).parent / "share" / "cmake" / "MLX"


def _installed(dist: str, name: str) -> Path | None:
    """The file of the installed distribution `dist` whose path ends with `name`, else None."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [f for f in files if str(f).replace("\\", "/").endswith(name)]
    return Path(found[0].locate()).resolve() if found else None


# The distributions of oneDNN's library and of its headers, which must be the same version.
LIBRARY_DIST = "onednn-cpu-gomp"
HEADERS_DIST = "onednn-devel-cpu-gomp"


@functools.cache
def onednn() -> tuple[Path, Path] | str:
    """(oneDNN's include directory, its libdnnl.so.3) as the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels
    installed them, or why not (one line)."""
    library = _installed(LIBRARY_DIST, "libdnnl.so.3")
    header = _installed(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
    if library is None or header is None:
        missing = " and ".join(d for d, f in ((LIBRARY_DIST, library), (HEADERS_DIST, header)) if f is None)
        return f"oneDNN is not installed ({missing}: pip install 'mlxllm[cpu-bf16]')"
    versions = {importlib.metadata.version(d) for d in (LIBRARY_DIST, HEADERS_DIST)}
    if len(versions) > 1:
        found = " and ".join(sorted(versions))
        return f"oneDNN's library and headers differ in version ({found}: pip install 'mlxllm[cpu-bf16]')"
    return header.parent.parent.parent, library


def key() -> str:
    """What a built module depends on: the source, MLX's version (its headers and ABI), oneDNN's version and
    place, Python's version."""
    import mlx.core as mx

    digest = hashlib.sha256()
    for path in sorted(SOURCE.iterdir()):
        if path.suffix in (".cpp", ".txt"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    found = onednn()
    dnnl = f"{importlib.metadata.version(LIBRARY_DIST)}|{found[1]}" if isinstance(found, tuple) else "none"
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    digest.update(f"{mx.__version__}|{dnnl}|{py}|{platform.machine()}".encode())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    """Where the module for this source, MLX and Python is (or will be) built."""
    return cache_dir() / "bf16gemm" / key()


def _built(where: Path) -> Path | None:
    found = sorted(where.glob(f"{MODULE}*.so")) if where.is_dir() else []
    return found[0] if found else None


def built() -> bool:
    """Whether the module for this source, MLX and Python is built already (load() then only imports it)."""
    return _built(build_dir()) is not None


def _tools() -> tuple[list[str], str | None]:
    """(the cmake arguments that pick the tools, the reason one is missing)."""
    found = onednn()
    if isinstance(found, str):
        return [], found
    cmake = shutil.which("cmake")
    if cmake is None:
        return [], "cmake is not on PATH"
    compiler = next((c for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
    if compiler is None:
        return [], "no C++ compiler (c++, g++ or clang++) is on PATH"
    try:
        import nanobind
    except ImportError:
        return [], "nanobind is not installed (pip install nanobind)"
    args = [cmake, f"-DCMAKE_CXX_COMPILER={shutil.which(compiler)}", f"-Dnanobind_DIR={nanobind.cmake_dir()}"]
    args += [f"-DMLX_DIR={_mlx_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
    args += [f"-DDNNL_INCLUDE_DIR={found[0]}", f"-DDNNL_LIBRARY={found[1]}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return args, None


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[0][:200]


def build(where: Path) -> str | None:
    """Build the module into `where` (made whole or not at all); None when done, else why not (one line)."""
    args, missing = _tools()
    if missing:
        return missing
    where.parent.mkdir(parents=True, exist_ok=True)
    print(f"mlxllm: building the bfloat16 GEMM extension (once) into {where}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=where.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        steps = (
            [*args, "-S", str(SOURCE), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release"],
            [args[0], "--build", str(work)],
        )
        log = []
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=BUILD_SECONDS)
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"its build could not run ({type(e).__name__}: {e})"
            log.append(done.stdout + done.stderr)
            if done.returncode != 0:
                (where.parent / _LOG).write_text("\n".join(log))
                return f"its build failed ({_last_error(done.stderr or done.stdout)}; log: {where.parent / _LOG})"
        module = _built(work)
        if module is None:
            return "its build made no module"
        staged = work / "module"
        staged.mkdir()
        shutil.copy2(module, staged / module.name)
        try:  # another process may have built it meanwhile: its copy is as good
            staged.rename(where)
        except OSError:
            if _built(where) is None:
                raise
    return None


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load() -> tuple[ModuleType | None, str | None]:
    """(the extension module, built first if need be; None and the reason in one line when it cannot be)."""
    reason = unsupported()
    if reason:
        return None, reason
    where = build_dir()
    if _built(where) is None:
        reason = build(where)
        if reason:
            return None, f"the bfloat16 GEMM extension could not be built: {reason}"
    # oneDNN prints its own errors on stdout unless told not to; the reason reaches the user as one line anyway.
    os.environ.setdefault("ONEDNN_VERBOSE", "none")
    try:
        return _import(_built(where)), None
    except Exception as e:  # an import error of a compiled module is any exception
        return None, f"the built bfloat16 GEMM extension does not load ({type(e).__name__}: {e})"
