"""Training speed side by side: mlxllm's compiled step, a plain MLX loop, PyTorch eager and compiled.

    python benchmarks/bench_train.py [--json results.json] [--config d256] [--memory-check]

The same as `mlxllm bench train`: the work is done by mlxllm.bench.train, and the PyTorch model
(mlxllm/bench/torch_reference.py) runs wherever torch is installed.
"""

import mlxllm  # noqa: F401 - loads the optimized BLAS before mlx.core
from mlxllm.bench.train import main

if __name__ == "__main__":
    main()
