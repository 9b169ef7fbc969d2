"""Data-parallel training: real processes in a real MLX ring group on 127.0.0.1 (mlx.launch, or the
variables it sets), compared with one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import tiny_configs

BIN = Path(sys.executable).parent
STEPS = 20


def _free_ports(n: int) -> int:
    """A first port with n free ports from it (mlx.launch's ring uses one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n < 65536 and all(_is_free(first + i) for i in range(n)):
            return first
    raise RuntimeError("no free ports on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _config(tmp_path: Path, corpus: Path, name: str, **train) -> Path:
    model, t, _ = tiny_configs(corpus, tmp_path / name, max_steps=STEPS, eval_interval=10, **train)
    lines = [
        "[model]",
        *(
            f"{k} = {json.dumps(v)}"
            for k, v in dict(
                n_layers=model.n_layers,
                d_model=model.d_model,
                n_heads=model.n_heads,
                n_kv_heads=model.n_kv_heads,
                max_seq_len=model.max_seq_len,
            ).items()
        ),
        "[tokenizer]",
        'kind = "byte"',
        "[train]",
    ]
    for key in (
        "data",
        "out_dir",
        "batch_size",
        "learning_rate",
        "warmup_steps",
        "max_steps",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "sample_tokens",
        "max_seconds",
        "grad_accum",
    ):
        if getattr(t, key) is not None:
            lines.append(f"{key} = {json.dumps(getattr(t, key))}")
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _launch(n: int, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "mlx.launch"),
        "-n",
        str(n),
        "--starting-port",
        str(_free_ports(n)),
        "--",
        str(BIN / "mlxllm"),
        *args,
    ]
    quiet_in, keep_open = os.pipe()  # an open, empty stdin: at end of file mlx.launch's input loop spins a core
    try:
        return subprocess.run(
            cmd, stdin=quiet_in, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
        )
    finally:
        os.close(quiet_in), os.close(keep_open)


def _train(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mlxllm"), "train", "--config", str(config), "--quiet", *extra],
        capture_output=True,
        text=True,
        timeout=180,
    )


def _weights(run_dir: Path, step: int = STEPS) -> dict[str, mx.array]:
    return mx.load(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def _max_diff(a: dict[str, mx.array], b: dict[str, mx.array]) -> float:
    assert a.keys() == b.keys()
    return max(mx.abs(a[k] - b[k]).max().item() for k in a)


def test_two_processes_train_as_one_and_resume_in_one(tmp_path: Path, corpus: Path) -> None:
    single = _train(_config(tmp_path, corpus, "single"))
    assert single.returncode == 0, single.stderr

    both = _launch(2, "train", "--config", str(_config(tmp_path, corpus, "pair")))
    assert both.returncode == 0, both.stdout + both.stderr
    assert "data-parallel over 2 processes (ring)" in both.stdout
    assert _max_diff(_weights(tmp_path / "pair"), _weights(tmp_path / "single")) < 1e-5
    # One writer: each logged step once, and the checkpoints of one run.
    steps = [json.loads(line)["step"] for line in (tmp_path / "pair" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]
    assert sorted(p.name for p in (tmp_path / "pair" / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]

    # Both ranks killed at step 15 (as a power cut would), then the run continued by one process.
    cut = _config(tmp_path, corpus, "cut", log_interval=5)
    crashed = _launch(2, "train", "--config", str(cut), env={"MLXLLM_CRASH_AT": "step:15"})
    assert "exited with code -9" in crashed.stderr  # mlx.launch itself exits 0
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_00000010"]
    resumed = _train(cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _max_diff(_weights(tmp_path / "cut"), _weights(tmp_path / "single")) < 1e-5


def test_grad_accum_composes_with_processes(tmp_path: Path, corpus: Path) -> None:
    single = _train(_config(tmp_path, corpus, "single", grad_accum=2))
    assert single.returncode == 0, single.stderr
    both = _launch(2, "train", "--config", str(_config(tmp_path, corpus, "pair", grad_accum=2)), "--quiet")
    assert "exited" not in both.stderr, both.stderr
    assert _max_diff(_weights(tmp_path / "pair"), _weights(tmp_path / "single")) < 1e-5


def _ring_env(rank: int, hostfile: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), **extra}


def _start_pair(
    tmp_path: Path, config: Path, rank1_env: dict[str, str], rank0_env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """The two processes of a ring group started as mlx.launch starts them, so each can be handled alone."""
    port = _free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    cmd = [str(BIN / "mlxllm"), "train", "--config", str(config), "--quiet", "--steps", "100000"]
    return [
        subprocess.Popen(
            cmd,
            env=_ring_env(0, hostfile, **(rank0_env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            cmd, env=_ring_env(1, hostfile, **rank1_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ),
    ]


def test_a_rank_that_dies_stops_the_other_with_a_clear_error(tmp_path: Path, corpus: Path) -> None:
    rank0, rank1 = _start_pair(tmp_path, _config(tmp_path, corpus, "dies"), {"MLXLLM_CRASH_AT": "step:10"})
    try:
        assert rank1.wait(timeout=120) == -signal.SIGKILL
        start = time.monotonic()
        _, err = rank0.communicate(timeout=60)
        assert time.monotonic() - start < 60
    finally:
        rank0.kill()
    assert rank0.returncode == 1
    assert "lost its connection to the training group" in err and "--resume" in err
    assert "Traceback" not in err


def test_a_stalled_rank_stops_the_other_within_the_limit(tmp_path: Path, corpus: Path) -> None:
    rank0, rank1 = _start_pair(tmp_path, _config(tmp_path, corpus, "stalls"), {}, {"MLXLLM_STALL_TIMEOUT": "4"})
    try:
        deadline = time.monotonic() + 120
        metrics = tmp_path / "stalls" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)  # training has started on both ranks
        os.kill(rank1.pid, signal.SIGSTOP)  # alive, connection open, never answering
        start = time.monotonic()
        _, err = rank0.communicate(timeout=90)
        waited = time.monotonic() - start
    finally:
        for p in (rank0, rank1):
            p.kill()
    assert rank0.returncode == 1 and waited < 30
    assert "made no progress" in err


def test_a_global_batch_that_does_not_split_is_refused(tmp_path: Path, corpus: Path) -> None:
    config = _config(tmp_path, corpus, "odd", batch_size=7)
    result = _launch(2, "train", "--config", str(config))
    assert "exited with code 1" in result.stderr  # mlx.launch itself exits 0
    assert "must split evenly over the 2 processes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "odd").exists()  # nothing written


def test_info_shows_the_group(tmp_path: Path) -> None:
    result = _launch(2, "info")
    assert result.returncode == 0, result.stderr
    assert "group: 2 processes (ring) on 1 machine(s); this is rank 0" in result.stdout
    assert "this is rank 1" in result.stdout


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_gradient_reduction_still_learns(tmp_path: Path, corpus: Path, dtype: str) -> None:
    config = _config(tmp_path, corpus, "bf16")
    result = _launch(2, "train", "--config", str(config), "--set", f"train.allreduce_dtype={json.dumps(dtype)}")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < 0.8 * rows[0]["loss"]
