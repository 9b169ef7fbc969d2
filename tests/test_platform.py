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
