"""model.dropout: residual and embedding dropout in training mode only, seeded by MLX's random state,
exactly the undropped model when 0 or in eval mode; it trains, its memory is estimated, and it is
exported and read back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, ModelConfig, RunConfig, TokenizerConfig, TrainConfig, train
from mlxllm import step as step_mod
from mlxllm.config import load_config
from mlxllm.hf_config import from_hf, to_hf
from mlxllm.memory import estimate_memory
from mlxllm.model import build_model, set_training

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs
from test_train import weights

SMALL = dict(vocab_size=61, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32)
IDS = mx.array([[(5 * i + 2) % 61 for i in range(24)]])


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.1", True, float("nan")])
def test_dropout_outside_zero_to_one_is_refused(bad):
    with pytest.raises(MlxllmError, match=r"dropout must be a probability in \[0, 1\)"):
        ModelConfig(dropout=bad)


def test_dropout_from_toml_is_a_float():
    assert ModelConfig(dropout=0).dropout == 0.0 and isinstance(ModelConfig(dropout=0).dropout, float)
    assert load_config(overrides=["model.dropout=0.25"]).model.dropout == 0.25


def test_dropout_zero_draws_nothing_and_equals_the_undropped_model():
    model = build_model(ModelConfig(**SMALL), seed=1)
    assert model.training  # MLX modules start in training mode: the default must not drop anyway
    state = mx.array(mx.random.state[0])
    trained_mode = model(IDS)
    assert mx.array_equal(mx.random.state[0], state).item()  # no random draws at all
    set_training(model, False)
    assert mx.array_equal(model(IDS), trained_mode).item()
    # A model with dropout, in eval mode, computes the same logits from the same weights.
    dropped = build_model(ModelConfig(**SMALL, dropout=0.3), seed=1)
    set_training(dropped, False)
    assert mx.array_equal(dropped(IDS), trained_mode).item()


def test_dropout_in_training_mode_follows_the_seed_and_eval_mode_does_not_drop():
    model = build_model(ModelConfig(**SMALL, dropout=0.3), seed=1)
    set_training(model, False)
    exact = model(IDS)
    assert set_training(model, True) is False  # the mode before
    outs = {}
    for seed in (1, 1, 2):
        mx.random.seed(seed)
        outs.setdefault(seed, []).append(model(IDS))
    assert mx.array_equal(outs[1][0], outs[1][1]).item()  # the same seed, the same masks
    assert not mx.allclose(outs[1][0], outs[2][0], atol=1e-3).item()  # another seed, other masks
    assert not mx.allclose(outs[1][0], exact, atol=1e-3).item()
    set_training(model, False)
    for seed in (1, 2):
        mx.random.seed(seed)
        assert mx.array_equal(model(IDS), exact).item()


def test_a_run_with_dropout_trains_and_keeps_the_setting(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=100, eval_interval=20)
    result = train(RunConfig(model=replace(m, dropout=0.1), tokenizer=k, train=t), show_progress=False)
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.2, losses
    assert load_config(tmp_path / "run" / "config.toml").model.dropout == 0.1


def test_a_run_with_dropout_resumes_exactly(corpus: Path, tmp_path: Path):
    # Each step's masks come from (seed, step), so a run stopped and resumed draws the same ones.
    m, t, k = tiny_configs(corpus, tmp_path / "straight", max_steps=12, eval_interval=6, warmup_steps=2)
    m = replace(m, dropout=0.1)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    split = replace(t, out_dir=str(tmp_path / "split"))
    first = train(RunConfig(model=m, tokenizer=k, train=split), show_progress=False, callback=lambda x: x["step"] >= 6)
    assert first.step == 6
    train(RunConfig(model=m, tokenizer=k, train=split), show_progress=False, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    other = replace(t, out_dir=str(tmp_path / "other"), seed=t.seed + 1)  # another seed, other masks (and batches)
    train(RunConfig(model=m, tokenizer=k, train=other), show_progress=False)
    assert any(not np.array_equal(a[n], v) for n, v in weights(tmp_path / "other").items())


def _peak(mc: ModelConfig, tc: TrainConfig) -> int:
    model = build_model(mc)
    opt = step_mod.make_optimizer(tc)
    opt.init(model.trainable_parameters())
    step = step_mod.make_step(model, opt, tc)
    batch = mx.array(np.random.default_rng(0).integers(0, mc.vocab_size, (1, tc.batch_size, 129), dtype=np.int32))
    mx.eval(step(batch))
    mx.reset_peak_memory()
    for _ in range(2):
        loss, _ = step(batch)
        mx.eval(loss, model.parameters(), opt.state)
    return mx.get_peak_memory()


def test_memory_estimate_counts_the_dropout_masks():
    mc = ModelConfig(vocab_size=65, n_layers=2, d_model=128, n_heads=4, max_seq_len=128)
    tc = TrainConfig(batch_size=8, seq_len=128, cpu_streams=1)
    estimated = [estimate_memory(replace(mc, dropout=p), 8, 128)["total"] for p in (0.0, 0.2)]
    measured = [_peak(replace(mc, dropout=p), tc) for p in (0.0, 0.2)]
    more, more_measured = estimated[1] - estimated[0], measured[1] - measured[0]
    assert more > 0 and 0.5 < more / more_measured < 2, (more, more_measured)


def test_dropout_round_trips_through_the_hf_config():
    cfg = ModelConfig(**SMALL, ffn_dim=192, dropout=0.15)  # from_hf reads an explicit ffn_dim
    d = to_hf(cfg, dtype="float32", eos_id=1)
    assert d["attention_dropout"] == 0.0  # mlxllm never drops attention probabilities
    assert d["resid_pdrop"] == d["embd_pdrop"] == 0.15
    assert from_hf(d, "config.json") == cfg
    plain = {k: v for k, v in d.items() if k not in ("resid_pdrop", "embd_pdrop")}
    assert from_hf({**plain, "attention_dropout": 0.1}, "config.json").dropout == 0.0  # another model's


def test_an_export_keeps_dropout_and_init_from_reads_it_back(corpus: Path, tmp_path: Path):
    pytest.importorskip("tokenizers", reason="the export extra (pip install '.[export]') is not installed")
    from mlxllm.export import export

    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=4, eval_interval=4)
    train(RunConfig(model=replace(m, dropout=0.2), tokenizer=k, train=t), show_progress=False)
    hf = export(tmp_path / "run", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["resid_pdrop"] == 0.2 and config["attention_dropout"] == 0.0
    _, t2, _ = tiny_configs(corpus, tmp_path / "ft", max_steps=2, eval_interval=2, init_from=str(hf))
    train(RunConfig(model=ModelConfig(), tokenizer=TokenizerConfig(kind="hf"), train=t2), show_progress=False)
    assert load_config(tmp_path / "ft" / "config.toml").model.dropout == 0.2
