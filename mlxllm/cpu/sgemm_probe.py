"""Single-threaded fp32 GEMM speed of one CBLAS library: run as a script, in a process of its own.

    python -I -S sgemm_probe.py /path/to/libblas.so      (prints GFLOP/s)

blas_choice.py runs it once per library it may load, so that the libraries it does not pick are never
loaded into mlxllm's process: the first one loaded with RTLD_GLOBAL provides MLX's cblas_* symbols.
Standard library only, and never imported by mlxllm (its package would load a BLAS of its own).
"""

from __future__ import annotations

import ctypes
import sys
import time

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
# (A transposed, M, N, K): what one layer's training step multiplies, for 2048 tokens and d_model 256:
# the forward of a 256 -> 768 projection and of its 768 -> 256 partner, and a weight gradient (X^T dY).
SHAPES = ((False, 2048, 768, 256), (False, 2048, 256, 768), (True, 256, 768, 2048))
REPEATS = 4  # timed calls per shape after a warm-up call; the fastest counts


def gflops(path: str) -> float:
    """GFLOP/s of cblas_sgemm from the library at `path` over SHAPES: their FLOPs over their best times."""
    sgemm = ctypes.CDLL(path).cblas_sgemm
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    sgemm.argtypes = [c_int] * 6 + [c_float, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    sgemm.restype = None
    size = max(m * n + m * k + k * n for _, m, n, k in SHAPES)
    buf = (c_float * size)()
    # Every byte 0x3f: every float 0.747, so products stay normal numbers (no subnormal slow path).
    ctypes.memset(buf, 0x3F, ctypes.sizeof(buf))
    base = ctypes.addressof(buf)
    flops = seconds = 0.0
    for trans_a, m, n, k in SHAPES:
        a, b, c = base, base + 4 * m * k, base + 4 * (m * k + k * n)
        lda = m if trans_a else k
        call = (ROW_MAJOR, TRANS if trans_a else NO_TRANS, NO_TRANS, m, n, k, 1.0, a, lda, b, n, 0.0, c, n)
        sgemm(*call)
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            sgemm(*call)
            best = min(best, time.perf_counter() - start)
        flops, seconds = flops + 2.0 * m * n * k, seconds + best
    return flops / seconds / 1e9


if __name__ == "__main__":
    print(f"{gflops(sys.argv[1]):.3f}")
