"""train.early_stop_patience: a run whose validation loss stops improving stops, keeps its best
checkpoint and says why; resuming it is coherent; patience 0 never stops a run."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, TrainConfig, train
from mlxllm import checkpoint as ckpt

import pytest
from conftest import tiny_configs

PATIENCE, EVERY = 2, 5


def _diverging(tmp_path: Path) -> Path:
    """A corpus whose validation split is text its training split never shows: the better the model
    learns the training text, the worse its validation loss. 9,000 + 999 bytes and the EOS are
    10,000 byte tokens, of which the last tenth, exactly the 'xyz' and the EOS, is the validation split."""
    path = tmp_path / "ab.txt"
    path.write_text("ab" * 4500 + "xyz" * 333)
    return path


def _run(data: Path, out: Path, **overrides) -> RunConfig:
    m, t, k = tiny_configs(data, out, eval_interval=EVERY, log_interval=EVERY, **overrides)
    return RunConfig(model=m, tokenizer=k, train=t)


def _val(result) -> list[tuple[int, float]]:
    return [(h["step"], h["val_loss"]) for h in result.history]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory):
    """(run config, result, printed output) of a run that stops early."""
    root = tmp_path_factory.mktemp("early")
    run = _run(_diverging(root), root / "run", max_steps=200, early_stop_patience=PATIENCE)
    with contextlib.redirect_stdout(io.StringIO()) as out:  # the progress lines and the one that says why
        result = train(run, show_progress=True)
    return run, result, out.getvalue()


def test_a_run_that_stops_improving_stops_early_and_keeps_its_best_checkpoint(stopped):
    run, result, printed = stopped
    run_dir = Path(run.train.out_dir)
    best_step, best = min(_val(result), key=lambda sv: sv[1])
    assert result.stopped_by == "early_stop" and result.step < run.train.max_steps
    assert result.step == best_step + PATIENCE * EVERY  # exactly `patience` evaluations after the best
    assert all(v >= best for s, v in _val(result) if s > best_step)
    kept = ckpt.best_checkpoint(run_dir)
    assert ckpt.read_state(kept)["step"] == best_step and result.best_val_loss == best
    assert ckpt.choose(run_dir) == kept  # generate and export read the best one
    line = next(x for x in printed.splitlines() if x.startswith("Stopped early"))
    assert f"at step {result.step}" in line and f"{best:.4f}" in line and kept.name in line


def test_resuming_a_run_that_stopped_early(stopped, tmp_path):
    run, result, _ = stopped
    copy = tmp_path / "run"
    shutil.copytree(run.train.out_dir, copy)
    run = replace(run, train=replace(run.train, out_dir=str(copy)))
    again = train(run, show_progress=False, resume=True)  # the same patience has run out: it stops at once
    assert (again.stopped_by, again.step, again.history) == ("early_stop", result.step, [])
    assert ckpt.read_state(ckpt.latest_checkpoint(copy))["evals_since_best"] == PATIENCE  # not one more
    more = replace(run.train, early_stop_patience=0, max_steps=result.step + 2 * EVERY)
    on = train(replace(run, train=more), show_progress=False, resume=True)  # patience off: it trains on
    assert (on.stopped_by, on.step) == ("max_steps", result.step + 2 * EVERY)
    assert [s for s, _ in _val(on)] == [result.step + EVERY, result.step + 2 * EVERY]


def test_patience_zero_never_stops_a_run(tmp_path):
    result = train(_run(_diverging(tmp_path), tmp_path / "run", max_steps=30), show_progress=False)
    assert (result.stopped_by, result.step) == ("max_steps", 30)
    best_step, _ = min(_val(result), key=lambda sv: sv[1])
    assert len([s for s, _ in _val(result) if s > best_step]) >= PATIENCE  # patience 2 would have stopped it


def test_patience_must_be_a_count():
    for bad in (-1, True, 1.5):
        with pytest.raises(MlxllmError, match="early_stop_patience must be 0"):
            TrainConfig(early_stop_patience=bad)
