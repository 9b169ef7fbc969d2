"""mlxllm: train small GPT-style language models on your own text with MLX."""

# The one side effect of importing mlxllm, here and before anything below imports mlx.core: MLX binds
# its BLAS when mlx.core is imported and reads MLX_BFS_MAX_WIDTH at its first evaluation, so on Linux
# an optimized BLAS is loaded and MLX's graph walk widened now (mlxllm/cpu/startup.py says why each).
from mlxllm.cpu import startup

startup.prepare()

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
