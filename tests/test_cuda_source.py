"""The CUDA kernels compile to PTX for sm_90 with nvcc, for every dtype.

The translation unit is the one `mx.fast.cuda_kernel` builds, with tests/cuda_tu.py's STAND_IN for MLX's
device header; to keep nvcc to one run per dtype, the single-kernel units are concatenated into one file.
tests/test_cuda_exec.py runs the same units on a GPU.
"""

import subprocess

import mlxllm  # noqa: F401  (must precede mlx.core)
from mlxllm.kernels.cuda import translation_unit

import mlx.core as mx
import pytest
from cuda_tu import NVCC, STAND_IN

# (head dim, causal, query heads per K/V head): the largest shared-memory case and a small non-causal one.
VARIANTS = [(128, True, 2), (64, True, 1), (32, False, 4)]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: cannot compile the CUDA kernels to PTX")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_kernels_compile_to_ptx(tmp_path, dtype):
    units = []
    for kind in ("forward", "dq", "dkv"):
        for d, causal, g in VARIANTS:
            src = translation_unit(kind, getattr(mx, dtype), d, causal, g, default_header=STAND_IN)
            assert "__global__ void custom_kernel_mlxllm_fa_" in src
            units.append(src)
    path = tmp_path / f"kernels_{dtype}.cu"
    path.write_text("\n".join(units))
    res = subprocess.run(
        [NVCC, "-arch=sm_90", "-ptx", "-std=c++17", str(path), "-o", str(path.with_suffix(".ptx"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    ptx = path.with_suffix(".ptx").read_text()
    assert ptx.count(".entry") == len(units)
    assert "shfl.sync" in ptx and "bar.sync" in ptx
