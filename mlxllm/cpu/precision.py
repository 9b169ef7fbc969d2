"""What a run computes in on the CPU when it asks for bfloat16.

MLX's CPU back-end has no fast bfloat16 (or float16) matrix product: it converts element by element and
runs a plain loop, a few GFLOP/s against the float32 BLAS's hundreds. A run that asks for bfloat16 there
takes oneDNN's bfloat16 matmul through mlxllm's extension where it is built and measured faster than float32
(cpu/bf16matmul.py: the matrix products in bfloat16, everything else in float32, as autocast does); else it
computes in float32 and says why in one line, and the memory estimate, the attention choice and the MFU
then follow float32, which is what runs. A float16 run computes in float32 likewise. MLXLLM_CPU_BF16=1
keeps MLX's own bfloat16 (for a build whose CPU matmuls are fast in it, or to measure the difference).
"""

from __future__ import annotations

import os

from mlxllm.cpu import bf16matmul

FORCE_ENV = "MLXLLM_CPU_BF16"
SLOW = ("bfloat16", "float16")


def compute_dtype(requested: str, backend: str) -> tuple[str, str | None]:
    """(the dtype a run computes in, the one line that says why it differs from `requested`, else None)
    on `backend` ('cpu', 'metal' or 'cuda'). bfloat16 on the CPU is kept only where oneDNN's bfloat16 matmul is
    the faster path (its first call may build the extension and measure it, about a minute once)."""
    if backend != "cpu" or requested not in SLOW or os.environ.get(FORCE_ENV, "") == "1":
        return requested, None
    reason = f"MLX's CPU matrix products in {requested} run at a few percent of float32's speed"
    if requested == "bfloat16":
        fast, why = bf16matmul.choose()
        if fast:
            return requested, None
        reason += f" and {why}"
    return "float32", (
        f"train.dtype = {requested} on the CPU: {reason}, so this run computes in float32 (more activation "
        f"memory, the same results to rounding; {FORCE_ENV}=1 keeps MLX's own {requested})."
    )


def held_dtype(dtype: str, backend: str) -> str:
    """The dtype a run's activations are held and mostly computed in, which the memory estimate and the MFU's
    peak follow: float32 for a bfloat16 run on oneDNN's bfloat16 matmul (only its products round to bfloat16),
    else the run's dtype."""
    return "float32" if backend == "cpu" and dtype == "bfloat16" and bf16matmul.chosen() else dtype
