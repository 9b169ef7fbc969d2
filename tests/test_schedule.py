"""The learning-rate schedule (cosine as before; warmup-stable-decay) and WSD's every-prefix property:
a cooldown branch from a stable-phase checkpoint trains to the same model as a fresh run of its length.

Runs go through the CLI (`mlxllm train --config ... [--resume]`), the interface a branch is trained by."""

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, TrainConfig, load_config
from mlxllm import checkpoint as ckpt
from mlxllm.branch import _stable_through, branch, branchable_steps
from mlxllm.cli import app
from mlxllm.config import dump_toml
from mlxllm.schedule import length_for_stable, lr_at, stable_steps

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs
from typer.testing import CliRunner

# The source run: WSD over K = 60 steps (stable phase 48), checkpoints at 20 (in the warmup), 40, 60.
WARMUP, K, S, F = 25, 60, 40, 0.2


def cosine_before_wsd(cfg: TrainConfig, step: int, progress: float) -> float:
    """lr_at as it was before schedules could be chosen (mlxllm/step.py), kept to compare against."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    floor = cfg.learning_rate * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.learning_rate - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def test_cosine_is_the_default_and_unchanged():
    assert TrainConfig().schedule == "cosine"
    for lr, warmup, ratio, steps in ((2e-3, 20, 0.1, 100), (3e-4, 7, 0.0, 333), (1.0, 1, 1.0, 5), (5e-3, 50, 0.37, 60)):
        for fraction in (0.2, 0.5):  # the cooldown fraction is WSD's alone
            cfg = TrainConfig(learning_rate=lr, warmup_steps=warmup, min_lr_ratio=ratio, max_steps=steps)
            cfg = replace(cfg, cooldown_fraction=fraction)
            for step in range(steps + 2):
                for progress in (step / steps, step / steps * 0.7, min(1.5, step / steps * 1.3)):
                    assert lr_at(cfg, step, progress) == cosine_before_wsd(cfg, step, progress), (cfg, step)


def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, max_steps=100, schedule="wsd")
    lrs = [lr_at(cfg, s, s / 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert stable_steps(100, 0.2) == 80 and lrs[10:80] == [1.0] * 70
    cooldown = lrs[80:]
    assert all(a > b for a, b in zip([1.0, *cooldown], cooldown))  # the first cooldown step is already lower
    assert cooldown[-1] == pytest.approx(0.1)  # the last step is trained at the floor
    # 1-sqrt: half-way down a quarter of the way in (step 84 is the 5th of 20), below a linear cooldown.
    assert cooldown[4] == pytest.approx(0.55)
    assert all(lr < 1.0 - 0.9 * (j + 1) / 20 for j, lr in enumerate(cooldown[:-1]))

    # Token and time budgets: the cooldown is the last 20% of the budget's progress.
    by_tokens = replace(cfg, max_tokens=10_000)
    assert lr_at(by_tokens, 50, 0.8) == 1.0 and lr_at(by_tokens, 99, 1.0) == pytest.approx(0.1)
    assert lr_at(by_tokens, 60, 0.9) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    by_time = replace(cfg, max_seconds=60.0)
    assert lr_at(by_time, 30, 0.8) == 1.0 and lr_at(by_time, 31, 0.85) < 1.0


def test_wsd_steps_before_the_cooldown_do_not_depend_on_the_length():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, schedule="wsd", cooldown_fraction=0.3)
    reference = [lr_at(replace(cfg, max_steps=400), s, s / 400) for s in range(400)]
    for n in range(11, 400):
        short = replace(cfg, max_steps=n)
        d = stable_steps(n, 0.3)
        assert [lr_at(short, s, s / n) for s in range(d)] == reference[:d], n
        assert lr_at(short, d, d / n) < 1.0 or d < 10, n


def test_length_for_stable():
    for step, fraction, total in ((40, 0.2, 50), (90, 0.1, 100), (30, 0.25, 40), (7, 0.3, 10), (1, 0.5, 2)):
        assert length_for_stable(step, fraction) == total
    for fraction in (0.01, 0.1, 0.2, 1 / 3, 0.5, 0.9, 0.99):
        for step in range(1, 300):
            total = length_for_stable(step, fraction)
            assert stable_steps(total, fraction) == step
            assert abs(total - step / (1 - fraction)) <= 1 / (1 - fraction), (step, fraction)


def test_bad_schedule_values_are_refused():
    for bad in (0, 0.0, 1, 1.0, 1.5, -0.2, float("nan"), "0.2", True):
        with pytest.raises(MlxllmError, match=r"cooldown_fraction must be a number between 0 and 1.*\(got "):
            TrainConfig(schedule="wsd", cooldown_fraction=bad)
    with pytest.raises(MlxllmError, match=r"cooldown_fraction .*\(got 1\.5\)"):
        load_config(overrides=["train.cooldown_fraction=1.5"])
    with pytest.raises(MlxllmError, match=r"schedule must be one of cosine, wsd \(got 'linear'\)"):
        TrainConfig(schedule="linear")
    r = CliRunner().invoke(app, ["train", "--set", "train.schedule=step", "--quiet"])
    assert r.exit_code == 1 and "schedule must be one of cosine, wsd" in r.output and r.exception is not None
    assert isinstance(r.exception, SystemExit)  # a message, not a traceback


def train_cli(*args: str) -> None:
    r = CliRunner().invoke(app, ["train", "--quiet", *args])
    assert r.exit_code == 0 and r.exception is None, (r.output, r.exception)


def write_config(path: Path, corpus: Path, out: Path, **train) -> Path:
    m, t, k = tiny_configs(corpus, out, **train)
    path.write_text(dump_toml(RunConfig(model=m, tokenizer=k, train=t)))
    return path


def files_of(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in run_dir.rglob("*")
        if p.is_file()
    }


def arrays(checkpoint: Path, name: str) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(checkpoint / name)).items()}


@pytest.fixture(scope="module")
def wsd_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wsd")
    wsd = dict(schedule="wsd", cooldown_fraction=F, warmup_steps=WARMUP, max_steps=K, keep_last=3)
    train_cli("--config", str(write_config(root / "source.toml", corpus, root / "source", **wsd)))
    return root / "source"


def test_a_cooldown_branch_is_the_fresh_shorter_run(corpus: Path, tmp_path: Path, wsd_run: Path):
    assert branchable_steps(wsd_run) == [S]  # 20 is in the warmup, 60 in the cooldown
    before = files_of(wsd_run)
    run = branch(wsd_run, S, tmp_path / "branch")
    total = S * 5 // 4  # S / (1 - F) = 50: a 10-step cooldown
    assert run.train.max_steps == total == length_for_stable(S, F) and run.train.schedule == "wsd"
    assert load_config(tmp_path / "branch" / "config.toml") == run
    copied = ckpt.latest_checkpoint(tmp_path / "branch")
    assert ckpt.read_state(copied)["step"] == S and ckpt.damaged_file(copied) is None
    assert load_config(copied / "config.toml") == run  # the copy's settings are the branch's, checksummed

    train_cli("--config", str(tmp_path / "branch" / "config.toml"), "--resume")
    fresh = dict(schedule="wsd", cooldown_fraction=F, warmup_steps=WARMUP, max_steps=total, keep_last=3)
    train_cli("--config", str(write_config(tmp_path / "fresh.toml", corpus, tmp_path / "fresh", **fresh)))
    assert files_of(wsd_run) == before  # the source is only read

    a, b = ckpt.latest_checkpoint(tmp_path / "branch"), ckpt.latest_checkpoint(tmp_path / "fresh")
    assert ckpt.read_state(a)["step"] == ckpt.read_state(b)["step"] == total
    for name in ("model.safetensors", "optimizer.safetensors"):
        wa, wb = arrays(a, name), arrays(b, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{name}: {key}")
    assert ckpt.read_state(a)["val_loss"] == ckpt.read_state(b)["val_loss"]
    rows = [
        [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("branch", "fresh")
    ]
    for key in ("step", "lr", "loss", "val_loss"):
        assert [r.get(key) for r in rows[0]] == [r.get(key) for r in rows[1]], key
    # The branch did train its cooldown: its weights left those of the source's checkpoint at S.
    start = arrays(ckpt.choose(wsd_run / "checkpoints" / f"step_{S:08d}"), "model.safetensors")
    end = arrays(a, "model.safetensors")
    assert start.keys() == end.keys() and any(not np.array_equal(start[k], end[k]) for k in start)


def test_branches_that_would_not_be_finished_runs_are_refused(corpus: Path, tmp_path: Path, wsd_run: Path):
    with pytest.raises(MlxllmError, match=r"no checkpoint at step 30 \(it has: 20, 40, 60\)"):
        branch(wsd_run, 30, tmp_path / "b")
    with pytest.raises(MlxllmError, match="inside the warmup"):
        branch(wsd_run, 20, tmp_path / "b")
    with pytest.raises(MlxllmError, match="in its cooldown"):
        branch(wsd_run, K, tmp_path / "b")
    with pytest.raises(MlxllmError, match="run directory of its own"):
        branch(wsd_run, S, wsd_run)
    branch(wsd_run, S, tmp_path / "b")
    with pytest.raises(MlxllmError, match="already holds a training run"):
        branch(wsd_run, S, tmp_path / "b")
    assert branch(wsd_run, S, tmp_path / "b", overwrite=True).train.max_steps == 50
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == [f"step_{S:08d}"]
    assert ckpt.damaged_file(ckpt.latest_checkpoint(tmp_path / "b")) is None

    cosine = write_config(tmp_path / "cosine.toml", corpus, tmp_path / "cosine", max_steps=10, warmup_steps=2)
    train_cli("--config", str(cosine), "--set", "eval_interval=5")
    assert branchable_steps(tmp_path / "cosine") == []
    with pytest.raises(MlxllmError, match="only a wsd run's checkpoints can be branched"):
        branch(tmp_path / "cosine", 5, tmp_path / "c")


def test_the_stable_phase_of_token_and_time_budgets():
    cfg = TrainConfig(schedule="wsd", max_steps=1000, max_tokens=100 * 512)  # 100 steps of 512 tokens
    assert _stable_through(cfg, {"step": 80, "tokens": 80 * 512, "elapsed": 1.0})
    assert not _stable_through(cfg, {"step": 81, "tokens": 81 * 512, "elapsed": 1.0})
    timed = replace(cfg, max_tokens=None, max_seconds=60.0)
    assert _stable_through(timed, {"step": 500, "tokens": 0, "elapsed": 48.0})
    assert not _stable_through(timed, {"step": 500, "tokens": 0, "elapsed": 50.0})
