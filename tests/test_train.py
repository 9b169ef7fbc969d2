import errno
import json
import math
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, TrainConfig, load, train
from mlxllm import checkpoint as ckpt
from mlxllm import step as step_mod
from mlxllm.data import prepare
from mlxllm.model import ModelConfig, build_model
from mlxllm.schedule import lr_at

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs


def weights(run_dir: Path, which: str = "latest") -> dict[str, np.ndarray]:
    path = ckpt.latest_checkpoint(run_dir) if which == "latest" else ckpt.best_checkpoint(run_dir)
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def test_tiny_model_learns_far_below_unigram_entropy(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=250, eval_interval=125)
    result = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    d = prepare(corpus, k)
    counts = np.bincount(np.asarray(d.train), minlength=257).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram = -(p * np.log(p)).sum()  # nats per token
    assert result.step == 250 and result.stopped_by == "max_steps"
    assert result.val_loss < 0.3 * unigram, (result.val_loss, unigram)
    assert result.val_bpb == pytest.approx(result.val_loss / math.log(2) / d.bytes_per_token)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_loss" in x] == [125, 250]
    for key in ("loss", "tokens_per_sec", "mfu", "peak_memory_gb", "lr", "val_bpb", "val_ppl"):
        assert key in lines[-1], key
    assert lines[0]["loss"] > lines[-1]["loss"]


def test_resume_continues_exactly(corpus: Path, tmp_path: Path):
    steps = dict(max_steps=30, eval_interval=15, warmup_steps=5)
    m, t, k = tiny_configs(corpus, tmp_path / "straight", **steps)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)

    t2 = replace(t, out_dir=str(tmp_path / "split"))
    first = train(
        RunConfig(model=m, tokenizer=k, train=t2), show_progress=False, callback=lambda metrics: metrics["step"] >= 15
    )  # "crash" at 15
    assert first.step == 15 and first.stopped_by == "callback"
    second = train(RunConfig(model=m, tokenizer=k, train=t2), show_progress=False, resume=True)
    assert second.step == 30

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0, err_msg=name)
    sa = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "straight"))
    sb = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "split"))
    assert sa["val_loss"] == pytest.approx(sb["val_loss"], abs=1e-6) and sa["tokens"] == sb["tokens"]


def test_gradient_accumulation_matches_a_larger_batch(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "big", max_steps=3, eval_interval=3, batch_size=8)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    train(
        RunConfig(model=m, tokenizer=k, train=replace(t, out_dir=str(tmp_path / "acc"), batch_size=4, grad_accum=2)),
        show_progress=False,
    )
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-5, err_msg=name)


def test_accumulated_micro_batches_run_one_after_another():
    """A grad_accum=4 step peaks near one micro-batch's memory, as estimate_memory assumes (traced
    as one graph, MLX ran parts of the micro-batches side by side: 2.7x)."""
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=2, max_seq_len=128)

    def step_memory(grad_accum: int) -> int:
        model = build_model(cfg)
        tc = TrainConfig(batch_size=8, seq_len=128, grad_accum=grad_accum)
        opt = step_mod.make_optimizer(tc)
        step = step_mod.make_step(model, opt, tc)
        batch = mx.array(np.random.default_rng(0).integers(0, 64, (grad_accum, 8, 129)), mx.int32)
        mx.eval(step(batch), model.parameters(), opt.state)  # compiles
        mx.eval(batch)
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step(batch), model.parameters(), opt.state)
        return mx.get_peak_memory() - base

    one, four = step_memory(1), step_memory(4)
    assert four < 1.3 * one, (one, four)


def test_validation_batches_run_one_after_another():
    """Evaluating 8 batches peaks near one batch's memory (as one graph: 1.6x at the quick start)."""
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=64, n_heads=2, max_seq_len=128)
    model = build_model(cfg)
    eval_fn = step_mod.make_eval(model, TrainConfig(batch_size=8, seq_len=128))
    batches = [np.random.default_rng(i).integers(0, 64, (8, 129)).astype(np.int32) for i in range(8)]

    def eval_memory(n: int) -> int:
        step_mod.evaluate(eval_fn, batches[:n], 1.0)  # compiles
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        step_mod.evaluate(eval_fn, batches[:n], 1.0)
        return mx.get_peak_memory() - base

    one, eight = eval_memory(1), eval_memory(8)
    assert eight < 1.3 * one, (one, eight)


def test_uncompiled_step_matches_compiled(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "c", max_steps=5, eval_interval=5)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    train(
        RunConfig(model=m, tokenizer=k, train=replace(t, out_dir=str(tmp_path / "u"), compile=False)),
        show_progress=False,
    )
    a, b = weights(tmp_path / "c"), weights(tmp_path / "u")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


def test_bfloat16_training_learns_with_fp32_master_weights(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "bf16", dtype="bfloat16", max_steps=60, eval_interval=30)
    result = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] < 3.0
    assert all(v.dtype == np.float32 for v in weights(tmp_path / "bf16").values())


def test_token_and_time_budgets(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "tok", max_steps=1000, max_tokens=8 * 64 * 12)
    r = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    assert r.step == 12 and r.tokens == 8 * 64 * 12 and r.stopped_by == "max_tokens"
    assert r.val_loss is not None and ckpt.latest_checkpoint(tmp_path / "tok").name.endswith("12")
    r = train(
        RunConfig(
            model=m, tokenizer=k, train=replace(t, out_dir=str(tmp_path / "sec"), max_tokens=None, max_seconds=2.0)
        ),
        show_progress=False,
    )
    assert r.stopped_by == "max_seconds" and 0 < r.step < 1000


def test_keeps_last_k_and_best(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "keep", max_steps=50, eval_interval=10, keep_last=2)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    kept = [p.name for p in ckpt.list_checkpoints(tmp_path / "keep")]
    best = ckpt.best_checkpoint(tmp_path / "keep")
    assert kept[-2:] == ["step_00000040", "step_00000050"] and best.name in kept and len(kept) <= 3
    assert not list((tmp_path / "keep" / "checkpoints").glob(".tmp*"))
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "config.toml", "tokenizer.json"):
        assert (best / name).exists()


def test_disk_full_keeps_previous_checkpoint(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    m, t, k = tiny_configs(corpus, tmp_path / "full", max_steps=20, eval_interval=10)
    real = mx.save_safetensors
    calls = {"n": 0}

    def flaky(path, arrays, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the second checkpoint runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, arrays) if metadata is None else real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", flaky)
    with pytest.raises(MlxllmError, match="disk is full.*step_00000010 is intact"):
        train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "full")] == ["step_00000010"]
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp*"))
    model, _ = load(tmp_path / "full")  # and it still loads
    assert model.config.n_layers == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    m, t, k = tiny_configs(corpus, tmp_path / "nan", max_steps=10, eval_interval=10)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    good = weights(tmp_path / "nan")
    real = step_mod.loss_fn
    monkeypatch.setattr(step_mod, "loss_fn", lambda model, batch: real(model, batch) * mx.array(float("nan")))
    with pytest.raises(MlxllmError, match=r"became nan by step 20.*step_00000010"):
        train(RunConfig(model=m, tokenizer=k, train=replace(t, max_steps=40)), show_progress=False, resume=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "nan")] == ["step_00000010"]
    after = weights(tmp_path / "nan")
    assert all((good[n] == after[n]).all() for n in good)


def test_run_directory_is_not_clobbered(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "once", max_steps=5, eval_interval=5)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    with pytest.raises(MlxllmError, match="already holds a training run.*--resume.*--overwrite"):
        train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    assert ckpt.latest_checkpoint(tmp_path / "once") is not None
    assert train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, overwrite=True).step == 5


def test_resume_refuses_a_different_model_or_tokenizer(corpus: Path, tmp_path: Path):
    from mlxllm import TokenizerConfig

    m, t, k = tiny_configs(corpus, tmp_path / "mismatch", max_steps=5, eval_interval=5)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    with pytest.raises(MlxllmError, match="model shape does not match.*d_model: checkpoint 64, now 32"):
        train(RunConfig(model=replace(m, d_model=32), tokenizer=k, train=t), show_progress=False, resume=True)
    with pytest.raises(MlxllmError, match="tokenizer or corpus differs"):
        train(
            RunConfig(model=m, tokenizer=TokenizerConfig(kind="bpe", vocab_size=300), train=t),
            show_progress=False,
            resume=True,
        )


def test_invalid_train_config():
    from mlxllm import TrainConfig

    with pytest.raises(MlxllmError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(MlxllmError, match="dtype must be one of"):
        TrainConfig(dtype="float8")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from mlxllm import TrainConfig

    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=110)
    lrs = [lr_at(cfg, s, s / 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(cfg, 110, 1.0) == pytest.approx(0.1)
