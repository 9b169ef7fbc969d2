"""mlxllm: train small GPT-style language models on your own text with MLX."""

from mlxllm import _blas

_blas.setup()  # must run before the first `import mlx.core`

from mlxllm.errors import MlxllmError  # noqa: E402
from mlxllm.model import ModelConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MlxllmError", "ModelConfig", "__version__"]
