"""Load a TOML config, override a few keys, and train: what `mlxllm train --config` does.

python examples/config_file.py configs/tiny.toml
MLXLLM_EXAMPLE_STEPS=10 python examples/config_file.py configs/tiny.toml   # a quick try
"""

import os
import sys

from mlxllm import load_config, train

steps = os.environ.get("MLXLLM_EXAMPLE_STEPS", "100")
run = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.toml", [f"train.max_steps={steps}"])
result = train(run, overwrite=True)
print(result.run_dir, result.val_loss)
