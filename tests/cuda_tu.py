"""Helpers for the CUDA kernel tests: the translation unit MLX would compile, built offline with nvcc.

The translation unit is the one `mx.fast.cuda_kernel` builds (see mlxllm/kernels/cuda.py), with one
substitution: MLX's default header includes `mlx/backend/cuda/device/utils.cuh`, which the pip package does
not ship, so STAND_IN provides what that header gives the kernels here (fp16/bf16 types, cuda::std limits).
Our kernels use nothing else from it, nor the `inf` macro MLX's default header defined before 0.32.0.

Several complete single-kernel units can be concatenated into one file for one nvcc run: the headers are
include-guarded, so each unit compiles as it would alone.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxllm.kernels.cuda import translation_unit
from mlxllm.kernels.fused import ROWS_PER_GROUP, inner_tile, launch_grid, template_args
from mlxllm.kernels.source import BODIES

import mlx.core as mx

NVCC = shutil.which("nvcc")

STAND_IN = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/limits>
#include <cooperative_groups.h>

"""

SIGNATURE = re.compile(r"__global__ void (\w+)\(\n(.*?)\) \{", re.S)
PARAM = re.compile(r"^\s*(const )?(\w+)\* (\w+)$")
STATIC_SHARED_LIMIT = 48 * 1024  # the most static __shared__ memory one CUDA block may declare


@dataclass(frozen=True)
class KernelLaunch:
    """What launching one kernel takes: the cubin symbol's source name, the parameters in order, the launch
    shape in blocks (as MLX's CustomKernel::eval_gpu derives it from fused.py's grid in threads)."""

    kind: str
    source: str
    kernel: str
    params: tuple[tuple[str, str, bool], ...]  # (CUDA type, name, is_output)
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    template: tuple[tuple[str, Any], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]


def signature(src: str) -> tuple[str, list[tuple[str, str, bool]]]:
    """The kernel's name and its parameters (CUDA type, name, is_output) as the translation unit declares them."""
    m = SIGNATURE.search(src)
    assert m, "no __global__ kernel in the translation unit"
    params = []
    for line in m.group(2).split(",\n"):
        p = PARAM.match(line)
        assert p, f"unexpected kernel parameter: {line!r}"
        params.append((p.group(2), p.group(3), p.group(1) is None))
    return m.group(1), params


def kernel_launch(
    kind: str,
    dtype: mx.Dtype,
    B: int,
    H: int,
    Hkv: int,
    L: int,
    D: int,
    causal: bool,
    rows: int = ROWS_PER_GROUP,
    tile: int | None = None,
) -> KernelLaunch:
    """How to launch kernel `kind` on (B, H, L, D) queries and (B, Hkv, L, D) keys, read off its source."""
    src = translation_unit(kind, dtype, D, causal, H // Hkv, rows, tile, default_header=STAND_IN)
    name, params = signature(src)
    threads, block = launch_grid(L, Hkv if kind == "dkv" else H, B, rows)
    grid = tuple(-(-g // b) for g, b in zip(threads, block))
    shapes = {"out": (B, H, L, D), "lse": (B, H, L), "dq": (B, H, L, D), "dk": (B, Hkv, L, D), "dv": (B, Hkv, L, D)}
    outs = [n for _, n, is_out in params if is_out]
    return KernelLaunch(
        kind=kind,
        source=src,
        kernel=name,
        params=tuple(params),
        grid=grid,
        block=block,
        template=tuple(template_args(dtype, D, causal, H // Hkv, rows, tile)),
        output_shapes=tuple(shapes[n] for n in outs),
        output_dtypes=tuple(mx.float32 if n == "lse" else dtype for n in outs),
    )


def declared_shared_bytes(kind: str, head_dim: int, rows: int = ROWS_PER_GROUP, tile: int | None = None) -> int:
    """Bytes of the kernel body's FA_SHARED float arrays, from their declared sizes (products of constants)."""
    values = {"NW": rows, "D": head_dim, "BK": inner_tile(head_dim) if tile is None else tile, "DP": head_dim + 1}
    total = 0
    for size in re.findall(r"FA_SHARED float \w+\[([^\]]+)\];", BODIES[kind]):
        n = 1
        for factor in size.split("*"):
            factor = factor.strip()
            n *= int(factor) if factor.isdigit() else values[factor]
        total += 4 * n
    return total


def compile_cubin(units: list[str], path: Path, arch: str) -> str:
    """nvcc the concatenated units to `path` (a .cubin) for sm_`arch`; returns ptxas's -v report."""
    assert NVCC is not None, "nvcc not found on PATH"
    cu = path.with_suffix(".cu")
    cu.write_text("\n".join(units))
    res = subprocess.run(
        [NVCC, f"-arch=sm_{arch}", "-cubin", "-std=c++17", "-Xptxas", "-v", str(cu), "-o", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-5000:]
    return res.stderr


def ptxas_resources(report: str) -> dict[str, dict[str, int]]:
    """Per mangled entry: registers, spill_stores, spill_loads, stack and smem bytes, from `-Xptxas -v`."""
    out: dict[str, dict[str, int]] = {}
    entry = None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            entry = m.group(1)
            out[entry] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
        elif entry and (
            m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        ):
            out[entry].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif entry and (m := re.search(r"Used (\d+) registers", line)):
            out[entry]["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                out[entry]["smem"] = int(s.group(1))
    return out


def mangled_name(cubin: bytes, kernel: str) -> str:
    """The cubin's symbol for `kernel` (declared in namespace mlx::core::cu, so C++-mangled)."""
    prefix = b"_ZN3mlx4core2cu%d%sE" % (len(kernel), kernel.encode())
    m = re.search(rb"\x00(" + re.escape(prefix) + rb"[^\x00]*)\x00", cubin)
    assert m, f"{kernel} is not in the cubin"
    return m.group(1).decode()
