"""What a run computes in on the CPU when it asks for bfloat16.

MLX's CPU back-end has no fast bfloat16 (or float16) matrix product: it converts element by element and
runs a plain loop, a few GFLOP/s against the float32 BLAS's hundreds, so `train.dtype = "bfloat16"` on
the CPU would train many times slower than float32 while saving only activation memory. A run that asks
for it there computes in float32 instead and says so in one line; the memory estimate, the attention
choice and the MFU then follow float32, which is what runs. MLXLLM_CPU_BF16=1 keeps bfloat16 (for a
build whose CPU matmuls are fast in it, or to measure the difference).
"""

from __future__ import annotations

import os

FORCE_ENV = "MLXLLM_CPU_BF16"
SLOW = ("bfloat16", "float16")


def compute_dtype(requested: str, backend: str) -> tuple[str, str | None]:
    """(the dtype a run computes in, the one line that says why it differs from `requested`, else None)
    on `backend` ('cpu', 'metal' or 'cuda')."""
    if backend != "cpu" or requested not in SLOW or os.environ.get(FORCE_ENV, "") == "1":
        return requested, None
    return "float32", (
        f"train.dtype = {requested} on the CPU: MLX's CPU matrix products in {requested} run at a few percent of "
        f"float32's speed, so this run computes in float32 (more activation memory, the same results to rounding; "
        f"{FORCE_ENV}=1 keeps {requested})."
    )
