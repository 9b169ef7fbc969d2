"""What MLX must be given before its first use, when mlxllm is imported: the one side effect of the import.

Two settings, both on Linux only, both read by MLX once and never again:
- an optimized BLAS (`blas.setup`), loaded before `import mlx.core`: MLX takes its BLAS when
  mlx.core is imported, and one loaded after that, even before the first matmul, is never called
  (tests/test_speed_setup.py shows both);
- MLX_BFS_MAX_WIDTH (`BFS_WIDTH`), which MLX reads at its first evaluation, whoever makes it (a
  user's script, `build_model`): set any later, it is ignored.
Everything else is set where it is used.
"""

from __future__ import annotations

import os
import sys

from mlxllm.cpu import blas

# MLX orders a graph by a breadth-first walk back from its outputs that turns depth-first wherever
# a level is wider than MLX_BFS_MAX_WIDTH, and stops queueing while ten tasks are outstanding. A
# depth-first stretch queues one stream's ops only, and the other streams idle until the walk comes
# back to them. A width above any level of our graphs keeps the walk breadth-first, so the streams'
# identical graphs interleave (cpu/streams.py splits a training step over them).
BFS_WIDTH = "10000"


def prepare() -> None:
    """Load an optimized BLAS (before mlx.core) and, for the Linux CPU backend, widen MLX's graph walk
    unless the user has set MLX_BFS_MAX_WIDTH; both no-ops elsewhere."""
    blas.setup()
    import mlx.core as mx  # after the BLAS

    if sys.platform.startswith("linux") and mx.default_device() == mx.cpu:
        os.environ.setdefault("MLX_BFS_MAX_WIDTH", BFS_WIDTH)
