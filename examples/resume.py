"""Stop a run part-way (here: after the first evaluation), then resume it exactly.

    python examples/resume.py
"""

from mlxllm import ModelConfig, TokenizerConfig, TrainConfig, train

model = ModelConfig(n_layers=2, d_model=128, n_heads=4, max_seq_len=128)
cfg = TrainConfig(out_dir="runs/resume-example", max_steps=100, eval_interval=50)
tok = TokenizerConfig(kind="byte")

first = train(model, cfg, tok, overwrite=True, callback=lambda metrics: metrics["step"] >= 50)
print(f"stopped at step {first.step} ({first.stopped_by})")
second = train(model, cfg, tok, resume=True)
print(f"resumed and finished at step {second.step}, validation loss {second.val_loss:.3f}")
