"""`mlxllm bench train --dtype bfloat16`: bfloat16 rows of mlxllm and PyTorch beside the float32 ones of
the same run, each labelled with what it really computed in and compared with PyTorch eager in its own
dtype; PyTorch's bfloat16 is autocast over float32 weights, gradients and AdamW state."""

from __future__ import annotations

import json
from pathlib import Path

from mlxllm.bench.precision_rows import MARK, mfu_text
from mlxllm.bench.train import TINY_CONFIG, main, run_benchmark
from mlxllm.bench.workers import load_torch_reference, model_config
from mlxllm.cli import app
from mlxllm.cpu.precision import FORCE_ENV, compute_dtype
from mlxllm.device import backend
from mlxllm.errors import MlxllmError

import numpy as np
import pytest
from typer.testing import CliRunner

QUICK = ["--config", "tiny", "--steps", "1", "--warmup", "1", "--windows", "1"]


def _torch_reference():
    pytest.importorskip("torch", reason="PyTorch (CPU) is not installed; .ci/run installs it")
    return load_torch_reference()


def test_bfloat16_rows_stand_beside_float32_ones_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _torch_reference()
    monkeypatch.delenv(FORCE_ENV, raising=False)
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path / "user-cache"))
    out = tmp_path / "bench.json"
    impls = ["--impl", "torch-eager", "--impl", "mlxllm", "--impl", "mlx-plain"]
    main([*QUICK, *impls, "--dtype", "bfloat16", "--json", str(out)])
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps long lines: compare words
    saved = json.loads(out.read_text())
    rows = {(r["impl"], r["dtype"]): r for r in saved["results"]}
    assert list(rows) == [
        ("torch-eager", "float32"),
        ("torch-eager", "bfloat16"),
        ("mlxllm", "float32"),
        ("mlxllm", "bfloat16"),
        ("mlx-plain", "float32"),
    ]
    for (_, dtype), r in rows.items():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_dtype"] == "float32"
        eager = rows[("torch-eager", dtype)]["tokens_per_s"]
        assert r["vs_torch_eager"] == pytest.approx(r["tokens_per_s"] / eager)  # against its own dtype's eager
        if dtype == "float32":
            assert r["dtype_label"] == "float32" and r["compute_dtype"] == "float32"

    torch16 = rows[("torch-eager", "bfloat16")]
    assert torch16["dtype_label"] == "bfloat16 autocast" and torch16["compute_dtype"] == "bfloat16"
    assert torch16["optimizer"] == rows[("torch-eager", "float32")]["optimizer"]  # the same AdamW, fp32 state
    # mlxllm's row computes in what training would: the rule's own answer, and its own line under the table.
    computed, why = compute_dtype("bfloat16", backend())
    mine = rows[("mlxllm", "bfloat16")]
    # The note's reason is the same; a GEMM measurement in it may differ by a few GFLOP/s between processes.
    assert mine["compute_dtype"] == computed and (mine["dtype_note"] or "")[:60] == (why or "")[:60]
    if backend() == "cpu" and computed == "float32":
        assert mine["dtype_label"] == "bfloat16 (computed in float32)"
        assert " ".join(mine["dtype_note"].split()) in printed
    elif backend() == "cpu":  # a CPU whose bfloat16 GEMM (AMX) is the faster path
        assert mine["dtype_label"] == "bfloat16" and why is None
    # The bfloat16 autocast row's MFU is against the float32 peak, and the table says so.
    assert mfu_text(torch16).endswith(MARK) and not mfu_text(rows[("torch-eager", "float32")]).endswith(MARK)
    assert mfu_text(mine).endswith(MARK) == (computed == "bfloat16")
    assert "no bfloat16 peak of this CPU is known" in printed
    assert "float32 only (no bfloat16 row): mlx-plain" in printed and saved["notes"]


def test_mlxllm_bfloat16_row_computes_in_bfloat16_where_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FORCE_ENV, "1")
    results = run_benchmark(
        [TINY_CONFIG], steps=1, warmup=1, windows=1, impls=("mlxllm",), show=False, dtype="bfloat16"
    )
    assert [(r["impl"], r["dtype"]) for r in results] == [("mlxllm", "float32"), ("mlxllm", "bfloat16")]
    r = results[1]
    assert r["compute_dtype"] == "bfloat16" and r["dtype_label"] == "bfloat16" and r["dtype_note"] is None
    assert r["tokens_per_s"] > 0 and r["vs_torch_eager"] is None  # no PyTorch row to compare with


def test_autocast_trains_the_same_model_with_float32_state() -> None:
    """PyTorch's bfloat16 rows: the forward under autocast (losses a rounding away from float32's), eager
    and compiled alike (aot_eager: the same Dynamo graphs, no code generation), with float32 weights,
    gradients and AdamW state."""
    ref = _torch_reference()
    import torch

    cfg = {"vocab_size": 65, "n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 32, "batch_size": 2}
    cfg["hidden_dim"] = model_config(cfg).hidden_dim
    batches = [torch.from_numpy(np.random.default_rng(i).integers(0, 65, (2, 33))) for i in range(3)]
    fp32 = ref.make_trainer(cfg)
    bf16 = ref.make_trainer(cfg, dtype="bfloat16")
    torch._dynamo.reset()
    compiled = ref.make_trainer(cfg, mode="compile", backend="aot_eager", dtype="bfloat16")
    want = [fp32.step(b).item() for b in batches]
    got = [bf16.step(b).item() for b in batches]
    got_compiled = [compiled.step(b).item() for b in batches]
    assert got != want  # bfloat16 matmuls round differently...
    np.testing.assert_allclose(got, want, rtol=2e-2)  # ...in the same model and step
    np.testing.assert_allclose(got_compiled, got, rtol=1e-2)
    assert got[0] != got[-1]  # it did train
    for t in (bf16, compiled):
        for p in t.model.parameters():
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
            state = t.adamw.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        ref.make_trainer(cfg, dtype="float16")


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(MlxllmError, match="--dtype must be one of float32, bfloat16"):
        run_benchmark([TINY_CONFIG], impls=("mlx-plain",), show=False, dtype="float16")
    result = CliRunner().invoke(app, ["bench", "train", "--dtype", "float16"])
    assert result.exit_code == 2 and "invalid choice" in result.output and "bfloat16" in result.output
