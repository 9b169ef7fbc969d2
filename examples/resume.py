"""Stop a run part-way (here: after the first evaluation), then resume it exactly.

python examples/resume.py
MLXLLM_EXAMPLE_STEPS=10 python examples/resume.py   # a quick try
"""

import os

from mlxllm import ModelConfig, RunConfig, TokenizerConfig, TrainConfig, train

steps = int(os.environ.get("MLXLLM_EXAMPLE_STEPS", "100"))
run = RunConfig(
    model=ModelConfig(n_layers=2, d_model=128, n_heads=4, max_seq_len=128),
    tokenizer=TokenizerConfig(kind="byte"),
    train=TrainConfig(out_dir="runs/resume-example", max_steps=steps, eval_interval=steps // 2),
)

first = train(run, overwrite=True, callback=lambda metrics: metrics["step"] >= steps // 2)
print(f"stopped at step {first.step} ({first.stopped_by})")
second = train(run, resume=True)
print(f"resumed and finished at step {second.step}, validation loss {second.val_loss:.3f}")
