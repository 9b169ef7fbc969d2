import json
import os
import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from mlxllm.cpu import blas as _blas

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


# Marker environments of the machines one `pip install mlxllm` has to serve (Python 3.11).
PLATFORMS = {
    "linux-x86_64": {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
    },
    "linux-aarch64": {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "aarch64",
        "os_name": "posix",
    },
    "darwin-arm64": {
        "sys_platform": "darwin",
        "platform_system": "Darwin",
        "platform_machine": "arm64",
        "os_name": "posix",
    },
}
# What each must get: the MLX build (its extras) and whether the pip-only MKL comes along.
WANTED = {"linux-x86_64": ({"cpu"}, True), "linux-aarch64": ({"cpu"}, False), "darwin-arm64": (set(), False)}


def _can_build_here() -> bool:
    """Whether this environment's setuptools meets the project's build requirement, so that pip can build
    the metadata without an isolated build environment (faster, and offline); a fresh venv's older one does not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import tomllib
    except ImportError:  # Python 3.10: the tomli dependency
        import tomli as tomllib

    (needed,) = [
        Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    ]
    try:
        return needed.specifier.contains(version(needed.name), prereleases=True)
    except PackageNotFoundError:
        return False


def _built_requirements(backend: str | None = None) -> list[Requirement]:
    """The Requires-Dist pip builds from this tree, as `pip install .` would install it (backend: with
    MLXLLM_BACKEND set to it, as `MLXLLM_BACKEND=cuda pip install .`; None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "MLXLLM_BACKEND"}
    if backend is not None:
        env["MLXLLM_BACKEND"] = backend
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            "--report",
            "-",
            *(["--no-build-isolation"] if _can_build_here() else []),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert report.returncode == 0, report.stderr
    (item,) = json.loads(report.stdout)["install"]
    assert item["metadata"]["name"] == "mlxllm"
    return [Requirement(r) for r in item["metadata"]["requires_dist"]]


def test_one_install_for_mac_and_linux():
    """The built wheel's requirements, with their markers evaluated for each platform as pip does."""
    reqs = _built_requirements()
    for platform_name, env in PLATFORMS.items():
        full = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.9", **env, "extra": ""}
        applies = [r for r in reqs if r.marker is None or r.marker.evaluate(full)]
        names = [r.name for r in applies]
        assert len(set(names)) == len(names), (platform_name, names)  # one MLX build, not two
        extras, mkl = WANTED[platform_name]
        (mlx,) = [r for r in applies if r.name == "mlx"]
        assert mlx.extras == extras, (platform_name, str(mlx))
        assert ("mkl" in names) == mkl, (platform_name, names)
        assert {"numpy", "typer", "rich", "tokenizers", "sentencepiece"} <= set(names)
        assert "tomli" not in names and "optuna" not in names  # 3.11 has tomllib; the search is an extra
    # The MLX this project is tested with meets the floor the wheel asks for.
    (linux_mlx,) = [r for r in reqs if r.name == "mlx" and "cpu" in r.extras]
    assert linux_mlx.specifier.contains(version("mlx"))
    old = {**default_environment(), **PLATFORMS["linux-x86_64"], "python_version": "3.10", "extra": ""}
    assert any(r.name == "tomli" and r.marker.evaluate(old) for r in reqs)


def _applying(reqs: list[Requirement], platform_name: str) -> list[Requirement]:
    """The requirements pip installs on `platform_name` (Python 3.11) when no extra is asked for."""
    env = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.9"}
    full = {**env, **PLATFORMS[platform_name], "extra": ""}
    return [r for r in reqs if r.marker is None or r.marker.evaluate(full)]


def test_the_cuda_install_brings_the_cuda_build_instead_of_the_cpu_one():
    """`MLXLLM_BACKEND=cuda pip install .` (cuda12: CUDA 12) as pip builds it: on Linux one MLX build, the
    CUDA one, without the CPU one or the CPU's BLAS; on macOS the same Metal install as the plain line."""
    default = _built_requirements()
    for backend, extra in (("cuda", "cuda13"), ("cuda12", "cuda12")):
        reqs = _built_requirements(backend)
        for platform_name in PLATFORMS:
            applies = _applying(reqs, platform_name)
            names = [r.name for r in applies]
            (mlx,) = [r for r in applies if r.name == "mlx"]
            if platform_name.startswith("linux"):
                assert mlx.extras == {extra} and "mkl" not in names, (backend, platform_name, names)
            else:
                assert {str(r) for r in applies} == {str(r) for r in _applying(default, platform_name)}
            assert {"numpy", "typer", "rich", "tokenizers", "sentencepiece"} <= set(names)
        # What stays optional is the same whichever MLX build the plain requirements name.
        assert {str(r) for r in reqs if r.marker and "extra" in str(r.marker)} == {
            str(r) for r in default if r.marker and "extra" in str(r.marker)
        }


def test_an_unknown_backend_is_refused_with_the_names_it_takes():
    with pytest.raises(AssertionError, match="names no MLX build: use cpu"):
        _built_requirements("rocm")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is for Linux only")
def test_optimized_blas_is_loaded_before_mlx_when_present():
    present = [c for c in _blas.CANDIDATES if c.startswith("/") and Path(c).exists()]
    if present:
        assert _blas.loaded is not None and "optimized CBLAS" in _blas.describe()
    else:
        assert _blas.loaded is None and "reference BLAS" in _blas.describe()


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the mkl wheel is mlxllm's pip-only BLAS on Linux x86_64 only",
)
def test_without_a_system_openblas_the_pip_installed_mkl_is_fast():
    """What a user without root gets: blas.py's search with every OpenBLAS hidden finds the `mkl`
    wheel that pip installed with mlxllm, and matmuls run far above the reference BLAS."""
    code = (
        "import importlib.util as u, sys, time\n"
        f"s = u.spec_from_file_location('blas_alone', {str(ROOT / 'mlxllm' / 'cpu' / 'blas.py')!r})\n"
        "b = u.module_from_spec(s); s.loader.exec_module(b)\n"
        "b.CANDIDATES = tuple(c for c in b.CANDIDATES if 'openblas' not in c)\n"
        "b.ctypes.util.find_library = lambda name: None\n"
        "b.setup()\n"
        "import mlx.core as mx\n"
        "a = mx.random.normal((1024, 1024)); mx.eval(a @ a)\n"
        "t = time.perf_counter(); [mx.eval(a @ a) for _ in range(5)]\n"
        "print(b.loaded, 5 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded, gflops = out.stdout.split()
    assert "libmkl_rt" in loaded and float(gflops) > 30, out.stdout  # the reference BLAS: ~6


def test_mlxllm_blas_none_is_said_loudly():
    from mlxllm.cli import app

    from typer.testing import CliRunner

    out = subprocess.run(
        [sys.executable, "-c", "from mlxllm.cli import main; main()", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MLXLLM_BLAS": "none"},
    )
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert "MLXLLM_BLAS=none" in out.stdout and "Warning:" in out.stderr and "pip install mkl" in out.stderr
    assert CliRunner().invoke(app, ["info"]).exit_code == 0
