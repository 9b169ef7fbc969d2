"""Training through the fused-attention path ('flash': the tiled reference on a CPU) equals 'fast'."""

from dataclasses import replace
from pathlib import Path

from mlxllm import RunConfig, train
from mlxllm import checkpoint as ckpt

import mlx.core as mx
import numpy as np
from conftest import tiny_configs


def test_flash_attention_training_matches_fast_over_50_steps(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "fast", max_steps=50, eval_interval=50)
    fast = train(RunConfig(model=replace(m, attention="fast"), tokenizer=k, train=t), show_progress=False)
    flash = train(
        RunConfig(model=replace(m, attention="flash"), tokenizer=k, train=replace(t, out_dir=str(tmp_path / "flash"))),
        show_progress=False,
    )
    assert abs(fast.val_loss - flash.val_loss) < 1e-4
    a = mx.load(str(ckpt.latest_checkpoint(tmp_path / "fast") / "model.safetensors"))
    b = mx.load(str(ckpt.latest_checkpoint(tmp_path / "flash") / "model.safetensors"))
    for name in a:
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), atol=1e-4, err_msg=name)
