"""benchmarks/precision_parity.py: its bfloat16 runs really compute in bfloat16 on float32 master weights, end
near float32, leave the environment as it was, and its ledger reports again without training."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

from mlxllm.cpu.precision import FORCE_ENV

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_parity.py"


def _bench():
    spec = importlib.util.spec_from_file_location("precision_parity", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("precision_parity", module)
    spec.loader.exec_module(module)
    return module


def test_bfloat16_runs_compute_in_bfloat16_and_the_ledger_reports_without_training(
    corpus, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    pp = _bench()
    keep = tmp_path / "keep"
    pp.main([str(corpus), "--quick", "--keep", str(keep)])
    first = capsys.readouterr().out
    assert FORCE_ENV not in os.environ  # set for the bfloat16 runs only, then put back
    runs = json.loads((keep / "results.json").read_text())["runs"]
    assert sorted(runs) == ["bfloat16/0", "bfloat16/1", "float32/0", "float32/1"]
    for r in runs.values():
        assert r["computed"] == r["dtype"] and r["steps"] == pp.QUICK["steps"]
        assert r["weights"] == "float32" and r["adamw"] == "float32"  # mixed precision: float32 masters
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < math.log(256)  # learned something
    for seed in (0, 1):
        f32, b16 = runs[f"float32/{seed}"]["val_loss"], runs[f"bfloat16/{seed}"]["val_loss"]
        assert f32 != b16  # bfloat16 rounding moved it: the float32 path would repeat float32's loss
        assert abs(f32 - b16) < 0.1 * f32
    assert "bfloat16  bfloat16" in first and ("PASS" in first or "MISS" in first)

    shutil.rmtree(keep / "runs")  # a rerun that trained again would make them anew
    pp.main([str(corpus), "--quick", "--keep", str(keep)])
    again = capsys.readouterr().out
    assert not (keep / "runs").exists() and again.count("kept in") == 4
    pp.main(["--report", str(keep)])
    report = capsys.readouterr().out
    table = first[first.index("\n2 x 64") : first.index("benchmark wall clock")]
    assert table in again and table in report
    assert report.count("--quick --keep") == 2  # both command lines recorded


def test_real_dtype_restores_a_value_that_was_set(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "0")
    pp = _bench()
    with pp.real_dtype("bfloat16"):
        assert os.environ[FORCE_ENV] == "1"
    assert os.environ[FORCE_ENV] == "0"
    with pp.real_dtype("float32"):
        assert os.environ[FORCE_ENV] == "0"
