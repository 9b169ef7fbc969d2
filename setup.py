"""mlxllm's dependencies, the one part of its metadata chosen when pip builds it: which MLX build Linux gets.

`pip install .` brings MLX with Metal on macOS and MLX's CPU build on Linux, with, on Linux x86_64, the
`mkl` wheel (a fast BLAS without root, see mlxllm/cpu/blas.py). `MLXLLM_BACKEND=cuda pip install .` brings
MLX's CUDA 13 build on Linux instead (`cuda12`: the CUDA 12 one), never both: the two builds ship the same
mlx/lib/libmlx.so, so one installed beside the other would leave whichever pip unpacked last.

An extra (`pip install '.[cuda]'`) cannot say "instead": pip installs a distribution's plain requirements
whatever extras are asked for (its base candidate's markers are evaluated with `extra` empty), so the CPU
build would come along with the CUDA one. Hence this switch, read at build time, like CMAKE_ARGS.
"""

from __future__ import annotations

import os

from setuptools import setup

BACKEND_ENV = "MLXLLM_BACKEND"
# MLXLLM_BACKEND -> the extra of MLX that brings that build on Linux (MLX's own names: mlx[cpu], mlx[cuda13]).
LINUX_MLX = {"cpu": "cpu", "cuda": "cuda13", "cuda13": "cuda13", "cuda12": "cuda12"}
MLX_VERSION = ">=0.32.4"
COMMON = [
    "numpy>=1.26",
    "sentencepiece>=0.2",
    "tokenizers>=0.19",
    "typer>=0.12",
    "rich>=13",
    # Chat templates of imported models, rendered in its sandbox (3.1.6: the last known sandbox escapes fixed).
    "jinja2>=3.1.6",
    "tomli>=2; python_version < '3.11'",
]


def requirements(backend: str) -> list[str]:
    """Requires-Dist for MLXLLM_BACKEND = `backend`: MLX (Metal on macOS, that build on Linux), the BLAS the
    CPU build needs, and the rest."""
    if backend not in LINUX_MLX:
        raise SystemExit(
            f"{BACKEND_ENV}={backend!r} names no MLX build: use cpu (the default), cuda (CUDA 13) or cuda12, "
            f"e.g. `{BACKEND_ENV}=cuda pip install .` on a Linux machine with an NVIDIA GPU."
        )
    mlx = [
        f"mlx{MLX_VERSION}; sys_platform == 'darwin'",
        f"mlx[{LINUX_MLX[backend]}]{MLX_VERSION}; sys_platform == 'linux'",
    ]
    # cuBLAS does the matmuls of a CUDA build: no CPU BLAS to bring.
    # nanobind (headers and CMake files, no compiling at install): the bfloat16 GEMM extension is built
    # with it when a run first asks for bfloat16 on the CPU (mlxllm/cpu/bf16build.py).
    x86_linux = "sys_platform == 'linux' and platform_machine == 'x86_64'"
    blas = [f"mkl>=2024; {x86_linux}", f"nanobind>=2.4; {x86_linux}"] if backend == "cpu" else []
    return mlx + blas + COMMON


setup(install_requires=requirements(os.environ.get(BACKEND_ENV, "cpu").strip().lower() or "cpu"))
