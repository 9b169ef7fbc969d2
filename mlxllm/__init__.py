"""mlxllm: train small GPT-style language models on your own text with MLX."""

# Process-wide set-up, all of it here and before the first `import mlx.core`: on Linux an optimized
# BLAS is loaded in place of MLX's reference one, and MLX's graph walk is widened so that a step
# split over CPU streams keeps every stream busy (see mlxllm.cpu).
from mlxllm.cpu import blas

blas.setup()

from mlxllm.cpu import streams  # noqa: E402 - imports mlx.core, after the BLAS

streams.widen_graph_walk()

from mlxllm.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig, load_config  # noqa: E402
from mlxllm.errors import MlxllmError  # noqa: E402
from mlxllm.generate import generate, load  # noqa: E402
from mlxllm.trainer import TrainResult, train  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "MlxllmError",
    "ModelConfig",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TrainResult",
    "generate",
    "load",
    "load_config",
    "train",
    "__version__",
]
