"""Load a TOML config, override a few keys, and train: what `mlxllm train --config` does.

    python examples/config_file.py configs/tiny.toml
"""

import sys

from mlxllm import load_config, train

run = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.toml", ["train.max_steps=100"])
result = train(run.model, run.train, run.tokenizer, overwrite=True)
print(result.run_dir, result.val_loss)
