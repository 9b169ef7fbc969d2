"""Train a small model on a text file with the Python API, then sample from it.

python examples/train_and_sample.py path/to/text.txt
MLXLLM_EXAMPLE_STEPS=10 python examples/train_and_sample.py path/to/text.txt   # a quick try
"""

import os
import sys

from mlxllm import ModelConfig, RunConfig, TokenizerConfig, TrainConfig, generate, load, train

data = sys.argv[1] if len(sys.argv) > 1 else None  # None: the built-in corpus
steps = int(os.environ.get("MLXLLM_EXAMPLE_STEPS", "200"))
run = RunConfig(
    model=ModelConfig(n_layers=4, d_model=256, n_heads=4, max_seq_len=256),
    tokenizer=TokenizerConfig(kind="bpe", vocab_size=2048),
    train=TrainConfig(data=data, out_dir="runs/example", max_steps=steps, eval_interval=50),
)
result = train(run, overwrite=True)
print(f"validation loss {result.val_loss:.3f}, {result.val_bpb:.3f} bits per byte")
model, tokenizer = load(result.run_dir)
print(generate(model, tokenizer, "", max_tokens=200, temperature=0.8, top_k=50))
