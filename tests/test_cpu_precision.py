"""train.dtype = bfloat16 on the CPU computes in float32 and says so (MLX's CPU has no fast bfloat16 matmul)."""

from __future__ import annotations

import time

import mlxllm  # noqa: F401  (the BLAS first)
from mlxllm.config import RunConfig
from mlxllm.cpu import bf16matmul
from mlxllm.cpu.precision import FORCE_ENV, compute_dtype
from mlxllm.memory import check_fits, estimate_memory
from mlxllm.trainer import train

import mlx.core as mx
import pytest
from conftest import tiny_configs


def _matmul_seconds(dtype: mx.Dtype, n: int = 512, reps: int = 3) -> float:
    a, b = (mx.random.normal((n, n)).astype(dtype) for _ in range(2))
    mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return (time.perf_counter() - start) / reps


def test_the_reason_holds_mlx_cpu_bfloat16_matmul_is_much_slower_than_float32():
    # If MLX's CPU ever gets a fast bfloat16 product, this fails and the float32 fallback should go.
    assert _matmul_seconds(mx.bfloat16) > 4 * _matmul_seconds(mx.float32)


def _no_bf16_gemm(monkeypatch):
    """The float32 fallback, whatever this machine's bfloat16 GEMM measures (an AMX CPU would choose it)."""
    monkeypatch.setattr(bf16matmul, "choose", lambda: (False, "the bfloat16 GEMM is left out in this test"))


def test_compute_dtype_on_each_backend(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    real, why = compute_dtype("bfloat16", "cpu")  # this machine's own choice: never MLX's slow bfloat16
    assert (real, why is None) in (("float32", False), ("bfloat16", True)) and (
        real == "bfloat16"
    ) == bf16matmul.chosen()
    _no_bf16_gemm(monkeypatch)
    dtype, why = compute_dtype("bfloat16", "cpu")
    assert dtype == "float32" and "bfloat16" in why and FORCE_ENV in why and "\n" not in why
    assert compute_dtype("float32", "cpu") == ("float32", None)
    assert compute_dtype("bfloat16", "metal") == ("bfloat16", None)
    assert compute_dtype("bfloat16", "cuda") == ("bfloat16", None)
    monkeypatch.setenv(FORCE_ENV, "1")
    assert compute_dtype("bfloat16", "cpu") == ("bfloat16", None)


def test_a_bfloat16_run_on_the_cpu_trains_in_float32_and_says_so_once(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    _no_bf16_gemm(monkeypatch)
    m, t, k = tiny_configs(corpus, tmp_path / "run", dtype="bfloat16", max_steps=4, eval_interval=4)
    run = RunConfig(model=m, tokenizer=k, train=t)
    result = train(run, show_progress=False)
    err = capsys.readouterr().err
    assert err.count("computes in float32") == 1
    assert 'dtype = "float32"' in (tmp_path / "run" / "config.toml").read_text()
    assert result.step == 4


def test_the_memory_refusal_on_the_cpu_does_not_suggest_bfloat16():
    from mlxllm.config import ModelConfig

    est = estimate_memory(ModelConfig(vocab_size=256), 64, 256)
    with pytest.raises(Exception) as e:
        check_fits(est, 64, 256, device=(est["total"] / 2, "a test"))
    assert "grad_checkpoint" in str(e.value) and "bfloat16" not in str(e.value)
