"""The scripts in examples/ run as a user runs them (a fresh Python, from a working directory of their
own), shortened with MLXLLM_EXAMPLE_STEPS, and leave what they say they do: a trained run with its
checkpoint, a resumed run, sampled text."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from mlxllm.checkpoint import latest_checkpoint, read_state

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, cwd: Path, *args: str, steps: int) -> str:
    env = {**os.environ, "MLXLLM_EXAMPLE_STEPS": str(steps)}  # the session's private MLXLLM_CACHE_DIR comes along
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_every_example_has_a_test() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["config_file.py", "resume.py", "train_and_sample.py"]


def test_config_file_example_trains_the_config(tmp_path: Path) -> None:
    stdout = run_example("config_file.py", tmp_path, str(ROOT / "configs" / "tiny.toml"), steps=6)
    run_dir, val_loss = stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert Path(run_dir) == Path("runs/tiny") and math.isfinite(float(val_loss))
    ckpt = latest_checkpoint(tmp_path / "runs" / "tiny")  # the config's out_dir, under the working directory
    assert ckpt is not None and read_state(ckpt)["step"] == 6  # the override, not the config's 300 steps
    assert read_state(ckpt)["val_loss"] == pytest.approx(float(val_loss), rel=1e-4)


def test_resume_example_stops_then_finishes(tmp_path: Path) -> None:
    stdout = run_example("resume.py", tmp_path, steps=8)
    assert "stopped at step 4 (callback)" in stdout
    m = re.search(r"resumed and finished at step (\d+), validation loss ([\d.]+)", stdout)
    assert m and int(m.group(1)) == 8 and float(m.group(2)) > 0, stdout
    steps = sorted(
        read_state(p)["step"]
        for p in (tmp_path / "runs" / "resume-example" / "checkpoints").iterdir()
        if (p / "state.json").exists()
    )
    assert steps == [4, 8]  # the resumed run kept the first half's checkpoint and added its own


def test_train_and_sample_example_samples_text(tmp_path: Path, corpus: Path) -> None:
    stdout = run_example("train_and_sample.py", tmp_path, str(corpus), steps=3)
    head, _, sample = stdout.partition("bits per byte\n")
    m = re.search(r"validation loss ([\d.]+), ([\d.]+)$", head.strip())
    assert m and math.isfinite(float(m.group(1))), stdout
    run_dir = tmp_path / "runs" / "example"
    assert read_state(latest_checkpoint(run_dir))["step"] == 3
    assert len(sample.strip()) > 20, stdout  # 200 sampled BPE tokens of text
