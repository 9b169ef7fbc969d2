"""A step split over CPU streams: same result as one stream, a sensible auto choice, BLAS threads restored."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, TrainConfig, train
from mlxllm import checkpoint as ckpt
from mlxllm.cpu import blas as _blas
from mlxllm.device import usable_cores
from mlxllm.step import stream_count

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    path = ckpt.latest_checkpoint(run_dir) / "model.safetensors"
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


@pytest.mark.parametrize("streams", [2, 4])
def test_split_step_matches_one_stream(corpus: Path, tmp_path: Path, streams: int):
    m, t, k = tiny_configs(corpus, tmp_path / "one", max_steps=8, eval_interval=8, cpu_streams=1)
    one = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    split = train(
        RunConfig(model=m, tokenizer=k, train=replace(t, out_dir=str(tmp_path / "split"), cpu_streams=streams)),
        show_progress=False,
    )
    assert split.val_loss == pytest.approx(one.val_loss, abs=1e-5)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "split")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-5, err_msg=name)


def test_split_step_with_accumulation_and_bfloat16(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(
        corpus, tmp_path / "one", max_steps=4, eval_interval=4, cpu_streams=1, grad_accum=2, dtype="bfloat16"
    )
    one = train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    split = train(
        RunConfig(model=m, tokenizer=k, train=replace(t, out_dir=str(tmp_path / "split"), cpu_streams=2)),
        show_progress=False,
    )
    assert split.val_loss == pytest.approx(one.val_loss, abs=2e-2)  # bf16 sums in another order


def test_auto_stream_count_divides_the_batch():
    cores = usable_cores()
    for batch in (1, 3, 8, 16, 24):
        n = stream_count(TrainConfig(batch_size=batch))
        assert 1 <= n <= min(cores, batch) and batch % n == 0, (batch, n)
    assert stream_count(TrainConfig(batch_size=16, cpu_streams=4)) == 4


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or mx.default_device().type != mx.DeviceType.cpu,
    reason="auto splits over streams only on the Linux CPU backend",
)
def test_auto_uses_every_core_on_the_linux_cpu():
    cores = usable_cores()
    n = stream_count(TrainConfig(batch_size=16))
    if cores == 1:
        assert n == 1
    else:
        assert n > 1  # 16 has a divisor between 2 and any core count


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or mx.default_device().type != mx.DeviceType.cpu or usable_cores() < 2,
    reason="auto splits over streams only on a multi-core Linux CPU",
)
def test_auto_keeps_small_models_on_one_stream():
    from mlxllm import ModelConfig

    tiny = ModelConfig(vocab_size=65, n_layers=2, d_model=32, n_heads=2, max_seq_len=64)
    big = ModelConfig(vocab_size=65, n_layers=4, d_model=256, n_heads=4, max_seq_len=256)
    assert stream_count(TrainConfig(batch_size=8), tiny) == 1  # splitting it measured slower
    assert stream_count(TrainConfig(batch_size=16), big) > 1
    assert stream_count(TrainConfig(batch_size=8, cpu_streams=2), tiny) == 2  # asked for


def test_stream_count_must_divide_the_batch():
    with pytest.raises(MlxllmError, match="multiple of cpu_streams"):
        TrainConfig(batch_size=16, cpu_streams=3)
    with pytest.raises(MlxllmError, match="cpu_streams"):
        TrainConfig(cpu_streams=-1)


@pytest.mark.skipif(
    _blas.threads() is None or not _blas.loaded, reason="needs a preloaded BLAS whose thread count can be set"
)
def test_blas_threads_lowered_for_streams_and_restored(corpus: Path, tmp_path: Path):
    before = _blas.threads()
    seen = []
    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=4, eval_interval=2, cpu_streams=2)
    train(
        RunConfig(model=m, tokenizer=k, train=t),
        show_progress=False,
        callback=lambda metrics: seen.append(_blas.threads()),
    )
    assert seen and all(n == max(1, usable_cores() // 2) for n in seen)
    assert _blas.threads() == before


def test_resume_with_streams_continues_exactly(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "straight", max_steps=12, eval_interval=6, warmup_steps=3, cpu_streams=2)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    t2 = replace(t, out_dir=str(tmp_path / "split"))
    assert (
        train(
            RunConfig(model=m, tokenizer=k, train=t2),
            show_progress=False,
            callback=lambda metrics: metrics["step"] >= 6,
        ).step
        == 6
    )
    assert train(RunConfig(model=m, tokenizer=k, train=t2), show_progress=False, resume=True).step == 12
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, rtol=0, err_msg=name)
