"""What mlxllm reads of this machine without MLX, so that it can be read before mlx.core is imported
(the BLAS choice, cpu/blas_choice.py): the cache directory and the CPU's /proc/cpuinfo fields."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where mlxllm keeps token files and measurements (MLXLLM_CACHE_DIR, else ~/.cache/mlxllm)."""
    return Path(os.environ.get("MLXLLM_CACHE_DIR") or Path.home() / ".cache" / "mlxllm")


def cpuinfo(field: str) -> str | None:
    """The first value of a /proc/cpuinfo field (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
