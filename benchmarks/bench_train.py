"""Training speed side by side: mlxllm's compiled step, a plain MLX loop, PyTorch eager and compiled.

    python benchmarks/bench_train.py [--json results.json] [--config d256] [--memory-check]

The work is done by mlxllm.bench_train (so `mlxllm bench train` runs the same thing); the PyTorch
model is benchmarks/torch_llama.py and runs only where torch is installed.
"""

import mlxllm  # noqa: F401 - loads the optimized BLAS before mlx.core
from mlxllm.bench_train import main, run_benchmark  # noqa: F401

if __name__ == "__main__":
    main()
