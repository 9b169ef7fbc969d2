"""Trading compute and micro-batches for memory. Gradient checkpointing gives the plain step's loss and
gradients at a lower measured peak and resumes exactly; train.micro_batch = "auto" trains a batch that
does not fit the memory given as the same global batch in smaller micro-batches (or checkpointed),
and refuses only what fits neither way; the estimate stays within its band of the measured peak."""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, ModelConfig, RunConfig, TokenizerConfig, TrainConfig, microbatch, train
from mlxllm import checkpoint as ckpt
from mlxllm import data as data_mod
from mlxllm import step as step_mod
from mlxllm.distributed import Group
from mlxllm.memory import HEADROOM, estimate_memory
from mlxllm.model import build_model, set_grad_checkpoint
from mlxllm.runstate import memory

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_configs
from mlx.utils import tree_flatten
from trainer_process import assert_same_state, rows

# The estimate against the measured peak of a compiled step: a band it must stay in, checked on
# three shapes (small and larger vocabularies, grouped-query attention, a longer context).
BAND = (0.75, 1.33)
SHAPES = [
    (ModelConfig(vocab_size=65, n_layers=2, d_model=128, n_heads=4, max_seq_len=128), 8, 128),
    (ModelConfig(vocab_size=512, n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, max_seq_len=128), 8, 128),
    (ModelConfig(vocab_size=256, n_layers=3, d_model=192, n_heads=6, max_seq_len=256), 4, 256),
]


def _gradients(mc: ModelConfig, checkpointed: bool) -> tuple[float, dict[str, mx.array]]:
    model = build_model(mc, seed=0)
    set_grad_checkpoint(model, checkpointed)
    batch = mx.array(np.random.default_rng(0).integers(0, mc.vocab_size, (4, 65)), mx.int32)
    mx.random.seed(3)  # the dropout masks' draws
    loss, grads = nn.value_and_grad(model, step_mod.loss_fn)(model, batch)
    mx.eval(loss, grads)
    return loss.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(dropout: float):
    mc = ModelConfig(vocab_size=64, n_layers=3, d_model=64, n_heads=4, max_seq_len=64, dropout=dropout)
    (loss, plain), (loss_c, checkpointed) = _gradients(mc, False), _gradients(mc, True)
    assert abs(loss - loss_c) < 1e-6
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert mx.abs(plain[name] - checkpointed[name]).max().item() < 1e-5, name


def _peak(mc: ModelConfig, batch_size: int, seq_len: int, grad_checkpoint: bool) -> int:
    """The measured peak of a compiled training step (after its first, which compiles), above what the
    process held before it: arrays other tests leave alive (a search's study, a cached model) are not its."""
    gc.collect()
    held = mx.get_active_memory()
    tc = TrainConfig(batch_size=batch_size, seq_len=seq_len, grad_checkpoint=grad_checkpoint)
    model = build_model(mc)
    opt = step_mod.make_optimizer(tc)
    opt.init(model.trainable_parameters())
    step = step_mod.make_step(model, opt, tc)
    batch = mx.array(np.random.default_rng(0).integers(0, mc.vocab_size, (1, batch_size, seq_len + 1)), mx.int32)
    mx.eval(step(batch), model.parameters(), opt.state)
    mx.reset_peak_memory()
    for _ in range(2):
        loss, _ = step(batch)
        mx.eval(loss, model.parameters(), opt.state)
    return mx.get_peak_memory() - held


@pytest.mark.parametrize("grad_checkpoint", [False, True])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_the_memory_estimate_is_within_its_band_of_the_measured_peak(shape: int, grad_checkpoint: bool):
    mc, batch_size, seq_len = SHAPES[shape]
    estimated = estimate_memory(mc, batch_size, seq_len, grad_checkpoint=grad_checkpoint)["total"]
    measured = _peak(mc, batch_size, seq_len, grad_checkpoint)
    assert BAND[0] < estimated / measured < BAND[1], (estimated, measured, estimated / measured)


def test_grad_checkpoint_lowers_the_measured_peak():
    mc = ModelConfig(vocab_size=64, n_layers=4, d_model=128, n_heads=4, max_seq_len=128)
    plain, checkpointed = _peak(mc, 8, 128, False), _peak(mc, 8, 128, True)
    assert checkpointed < 0.75 * plain, (plain, checkpointed)


def test_grad_checkpoint_trains_as_without_and_resumes_exactly(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "plain", max_steps=20, eval_interval=10)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    ck = replace(t, out_dir=str(tmp_path / "checkpointed"), grad_checkpoint=True)
    train(RunConfig(model=m, tokenizer=k, train=ck), show_progress=False)
    assert_same_state(
        ckpt.latest_checkpoint(tmp_path / "plain"), ckpt.latest_checkpoint(tmp_path / "checkpointed"), 1e-5
    )

    dropped = replace(m, dropout=0.1)  # the masks too are drawn again exactly on resume
    straight = replace(ck, out_dir=str(tmp_path / "straight"))
    train(RunConfig(model=dropped, tokenizer=k, train=straight), show_progress=False)
    halves = RunConfig(model=dropped, tokenizer=k, train=replace(ck, out_dir=str(tmp_path / "halves")))
    assert train(halves, show_progress=False, callback=lambda metrics: metrics["step"] == 10).step == 10
    assert train(halves, show_progress=False, resume=True).step == 20
    assert_same_state(ckpt.latest_checkpoint(tmp_path / "straight"), ckpt.latest_checkpoint(tmp_path / "halves"))


def test_auto_micro_batches_train_a_batch_that_does_not_fit_as_explicit_grad_accum(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    m, t, k = tiny_configs(corpus, tmp_path / "auto", batch_size=16, max_steps=10, log_interval=2, micro_batch="auto")
    vocab = data_mod.prepare(str(corpus), k, val_fraction=t.val_fraction).tokenizer.vocab_size
    sized = RunConfig(model=replace(m, vocab_size=vocab), tokenizer=k, train=t)
    need = {b: memory(replace(sized, train=replace(t, batch_size=b, grad_accum=16 // b)), 64)["total"] for b in (4, 8)}
    assert need[8] > 1.01 * need[4]
    monkeypatch.setenv("MLXLLM_MEMORY_LIMIT", str(int(1.005 * need[4] / HEADROOM)))  # 4 rows fit, 8 do not

    with pytest.raises(MlxllmError, match="This run needs about"):  # as given, it does not fit
        train(RunConfig(model=m, tokenizer=k, train=replace(t, micro_batch="fixed")), show_progress=False)
    capsys.readouterr()
    auto = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    note = capsys.readouterr().err
    assert "Memory: micro-batches of 16 rows need about" in note
    assert "training the same global batch of 16 rows as 4 micro-batches of 4 rows (train.grad_accum = 4)" in note
    explicit = replace(t, out_dir=str(tmp_path / "explicit"), batch_size=4, grad_accum=4, eval_batches=16)
    explicit = train(RunConfig(model=m, tokenizer=k, train=replace(explicit, micro_batch="fixed")), show_progress=False)
    assert [r["loss"] for r in rows(tmp_path / "auto")] == [r["loss"] for r in rows(tmp_path / "explicit")]
    assert auto.val_loss == explicit.val_loss
    assert_same_state(ckpt.latest_checkpoint(tmp_path / "explicit"), ckpt.latest_checkpoint(tmp_path / "auto"))


def test_auto_turns_on_checkpointing_when_no_split_fits_and_refuses_what_fits_neither_way(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    mc = ModelConfig(vocab_size=256, n_layers=6, d_model=64, n_heads=4, max_seq_len=256)
    run = RunConfig(
        model=mc, tokenizer=TokenizerConfig(kind="byte"), train=TrainConfig(batch_size=4, micro_batch="auto")
    )

    def estimate(r: RunConfig) -> dict[str, float]:
        return memory(r, 256)

    one_row = estimate(replace(run, train=replace(run.train, batch_size=1, grad_accum=4)))["total"]
    monkeypatch.setenv("MLXLLM_MEMORY_LIMIT", str(int(0.99 * one_row / HEADROOM)))  # no split fits
    chosen = microbatch.fit(run, estimate, Group())
    assert chosen.train.grad_checkpoint and chosen.train.batch_size * chosen.train.grad_accum == 4
    assert estimate(chosen)["total"] <= 0.99 * one_row
    assert "with gradient checkpointing (train.grad_checkpoint" in capsys.readouterr().err

    monkeypatch.setenv("MLXLLM_MEMORY_LIMIT", "1MB")
    with pytest.raises(MlxllmError, match=r"does not fit .* even as micro-batches of 1 row\(s\) with gradient"):
        microbatch.fit(run, estimate, Group())
