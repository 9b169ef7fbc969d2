"""Crashes, power cuts and second processes: a killed run resumes bit-exactly with one metrics row per
step, a damaged checkpoint is detected and passed over, and one trainer at a time holds a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, load, train
from mlxllm import checkpoint as ckpt

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs

TESTS = Path(__file__).resolve().parent


def _train_in_subprocess(
    corpus: Path, out: Path, crash_at: str | None = None, wait: bool = True, **overrides
) -> subprocess.Popen:
    """train() in another process (so that it can be killed), with tiny_configs and these overrides."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from conftest import tiny_configs; "
        "from mlxllm import RunConfig, train; "
        f"m, t, k = tiny_configs({str(corpus)!r}, {str(out)!r}, **{overrides!r}); "
        "train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, resume=True)"
    )
    env = {**os.environ, **({"MLXLLM_CRASH_AT": crash_at} if crash_at else {})}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.wait(timeout=300)
    return proc


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}


def _opt_state(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path / "optimizer.safetensors")).items()}


def test_killed_in_training_and_in_a_checkpoint_resumes_exactly(corpus: Path, tmp_path: Path):
    settings = dict(max_steps=40, eval_interval=10, log_interval=5)
    m, t, k = tiny_configs(corpus, tmp_path / "straight", **settings)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)

    out = tmp_path / "killed"
    first = _train_in_subprocess(corpus, out, crash_at="step:25", **settings)  # after step 25 was logged
    assert first.returncode == -signal.SIGKILL
    second = _train_in_subprocess(corpus, out, crash_at="checkpoint:30", **settings)  # inside the step-30 save
    assert second.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_dir(out).iterdir())  # the torn save
    third = _train_in_subprocess(corpus, out, **settings)
    assert third.returncode == 0, third.stderr.read()

    a, b = ckpt.latest_checkpoint(tmp_path / "straight"), ckpt.latest_checkpoint(out)
    assert a.name == b.name == "step_00000040"
    for want, got in ((_weights(a), _weights(b)), (_opt_state(a), _opt_state(b))):
        assert want.keys() == got.keys()
        for name in want:
            assert np.array_equal(want[name], got[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))  # one row per logged step, none repeated
    assert not any(p.name.startswith(".tmp-") for p in ckpt.checkpoint_dir(out).iterdir())


def test_a_damaged_checkpoint_is_detected_and_the_previous_one_used(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=20, eval_interval=10, keep_last=3)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    last = ckpt.latest_checkpoint(tmp_path / "run")
    want = _weights(last)
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a torn write: the file is short
    with pytest.raises(MlxllmError, match="model.safetensors is missing or does not match"):
        load(last)
    assert train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, resume=True).step == 20
    assert "step_00000020 is damaged" in capsys.readouterr().err
    again = ckpt.latest_checkpoint(tmp_path / "run")
    assert again.name == "step_00000020" and ckpt.damaged_file(again) is None
    for name, value in _weights(again).items():
        assert np.array_equal(value, want[name]), name  # retrained from step 10: the same weights
    assert (ckpt.checkpoint_dir(tmp_path / "run") / ".damaged-step_00000020").is_dir()  # kept, set aside
    flipped = bytearray((again / "model.safetensors").read_bytes())
    flipped[-1] ^= 0xFF  # a changed byte, same length
    (again / "model.safetensors").write_bytes(bytes(flipped))
    assert ckpt.damaged_file(again) == "model.safetensors"


def test_a_second_trainer_is_refused_and_a_dead_ones_lock_does_not_stick(corpus: Path, tmp_path: Path):
    out = tmp_path / "live"
    live = _train_in_subprocess(corpus, out, wait=False, max_steps=100_000, eval_interval=10)
    try:
        deadline = time.monotonic() + 120
        while not list(ckpt.list_checkpoints(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.list_checkpoints(out), "the first trainer wrote no checkpoint within 120 s"
        m, t, k = tiny_configs(corpus, out, max_steps=100_000, eval_interval=10)
        with pytest.raises(MlxllmError, match=rf"Another mlxllm process \(pid {live.pid}\) is training"):
            train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, resume=True)
        with pytest.raises(MlxllmError, match="Another mlxllm process"):
            train(
                RunConfig(model=m, tokenizer=k, train=t), show_progress=False, overwrite=True
            )  # nor may it be replaced under it
        assert ckpt.list_checkpoints(out)
    finally:
        live.kill()
        live.wait(timeout=30)
    m, t, k = tiny_configs(
        corpus, out, max_steps=ckpt.read_state(ckpt.latest_checkpoint(out))["step"] + 5, eval_interval=10
    )
    assert train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, resume=True).step > 0


def test_overwrite_replaces_a_run_but_never_a_folder_that_holds_none(corpus: Path, tmp_path: Path):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.txt").write_text("irreplaceable")
    m, t, k = tiny_configs(corpus, mine, max_steps=2, eval_interval=2)
    with pytest.raises(MlxllmError, match="is not empty and holds no training run"):  # refused, untouched
        train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, overwrite=True)
    assert (mine / "thesis.txt").read_text() == "irreplaceable"
    (tmp_path / "run").mkdir()
    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=2, eval_interval=2)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    (tmp_path / "run" / "stale.txt").write_text("from the old run")
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, overwrite=True)
    assert not (tmp_path / "run" / "stale.txt").exists() and ckpt.latest_checkpoint(tmp_path / "run")


def test_overwrite_refuses_a_folder_of_other_files_and_trains_into_an_empty_one(corpus: Path, tmp_path: Path):
    mine = tmp_path / "my-files"
    (mine / "notes").mkdir(parents=True)
    (mine / "thesis.txt").write_text("irreplaceable")
    m, t, k = tiny_configs(corpus, mine, max_steps=2, eval_interval=2)
    with pytest.raises(MlxllmError, match=r"my-files is not empty and holds no training run \(notes, thesis.txt\)"):
        train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, overwrite=True)
    assert sorted(p.name for p in mine.iterdir() if p.name != ".lock") == ["notes", "thesis.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    m, t, k = tiny_configs(corpus, empty, max_steps=2, eval_interval=2)
    assert train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, overwrite=True).step == 2


def test_resume_with_nothing_to_resume_says_so_and_starts_a_new_run(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    m, t, k = tiny_configs(corpus, tmp_path / "new", max_steps=4, eval_interval=2)
    assert train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, resume=True).step == 4
    assert f"Note: --resume: {tmp_path / 'new'} holds no checkpoint to resume; starting a new run." in (
        capsys.readouterr().err
    )
    assert (
        train(RunConfig(model=m, tokenizer=k, train=replace(t, max_steps=6)), show_progress=False, resume=True).step
        == 6
    )
    assert "holds no checkpoint" not in capsys.readouterr().err  # it had one
