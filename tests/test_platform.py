import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlxllm.cpu import blas as _blas

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_one_install_for_mac_and_linux():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "mlx>=0.32.4; sys_platform == 'darwin'" in deps
    assert "mlx[cpu]>=0.32.4; sys_platform == 'linux'" in deps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is for Linux only")
def test_optimized_blas_is_loaded_before_mlx_when_present():
    present = [c for c in _blas.CANDIDATES if c.startswith("/") and Path(c).exists()]
    if present:
        assert _blas.loaded is not None and "optimized CBLAS" in _blas.describe()
    else:
        assert _blas.loaded is None and "reference BLAS" in _blas.describe()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the mkl wheel is mlxllm's pip-only BLAS on Linux x86_64 only")
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
    from typer.testing import CliRunner

    from mlxllm.cli import app

    out = subprocess.run([sys.executable, "-c", "from mlxllm.cli import main; main()", "info"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MLXLLM_BLAS": "none"})
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert "MLXLLM_BLAS=none" in out.stdout and "Warning:" in out.stderr and "pip install mkl" in out.stderr
    assert CliRunner().invoke(app, ["info"]).exit_code == 0
