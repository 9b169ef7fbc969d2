"""mlxllm: train small GPT-style language models on your own text with MLX."""

from mlxllm import _blas

_blas.setup()  # must run before the first `import mlx.core`

from mlxllm.config import RunConfig, load_config  # noqa: E402
from mlxllm.errors import MlxllmError  # noqa: E402
from mlxllm.generate import generate, load  # noqa: E402
from mlxllm.model import ModelConfig  # noqa: E402
from mlxllm.tokenizer import TokenizerConfig  # noqa: E402
from mlxllm.train import TrainConfig, TrainResult, train  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "MlxllmError", "ModelConfig", "RunConfig", "TokenizerConfig", "TrainConfig", "TrainResult",
    "generate", "load", "load_config", "train", "__version__",
]
