"""`mlxllm train` as a real process, for the tests that signal, starve or stop it: its config file,
starting it, waiting for what it writes, and comparing the checkpoints two runs end with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlxllm import RunConfig
from mlxllm import checkpoint as ckpt
from mlxllm.config import dump_toml

import mlx.core as mx
import numpy as np
from conftest import tiny_configs

BIN = Path(sys.executable).parent


def write_config(path: Path, corpus: Path, out: Path, **train) -> Path:
    """A TOML config of tiny_configs with these train overrides, training into `out`."""
    m, t, k = tiny_configs(corpus, out, **train)
    path.write_text(dump_toml(RunConfig(model=m, tokenizer=k, train=t)))
    return path


def command(config: Path, *extra: str) -> list[str]:
    return [str(BIN / "mlxllm"), "train", "--config", str(config), "--quiet", *extra]


def start(config: Path, *extra: str, env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    """`mlxllm train --config CONFIG --quiet EXTRA` started, its output captured."""
    return subprocess.Popen(
        command(config, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )


def wait_until(done, what: str, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    """Poll `done()` every few milliseconds; fail with `what` after `timeout` s or when `proc` ends first."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended (code {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.005)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def arrays(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_state(a: Path, b: Path, atol: float = 0.0, files: tuple[str, ...] = ("model", "optimizer")) -> None:
    """Two checkpoints hold the same weights and optimizer state (`files`): bit for bit, or within atol."""
    for name in (f"{f}.safetensors" for f in files):
        want, got = arrays(a / name), arrays(b / name)
        assert want.keys() == got.keys(), name
        for key in want:
            if atol:
                np.testing.assert_allclose(got[key], want[key], atol=atol, err_msg=f"{name}: {key}")
            else:
                assert np.array_equal(got[key], want[key]), f"{name}: {key}"


def step_of(path: Path) -> int:
    return ckpt.read_state(path)["step"]
