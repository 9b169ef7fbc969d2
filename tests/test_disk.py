"""A run's disk, with real filesystems: a tmpfs that fills during a save, a directory that turns
read-only, one removed under the run, a file size limit, and a disk too small for the checkpoints
before training starts. Each ends with one paragraph and exit code 1, never a traceback; the
checkpoints before are intact and the run resumes bit-exactly."""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

from mlxllm import RunConfig, TokenizerConfig, load_config, train
from mlxllm import checkpoint as ckpt
from mlxllm import data as data_mod
from mlxllm.diskspace import checkpoint_bytes
from mlxllm.errors import MlxllmError

import pytest
import small_disk
from conftest import tiny_configs
from trainer_process import assert_same_state, command, start, wait_until, write_config

SETTINGS = dict(max_steps=40, eval_interval=10, log_interval=10, keep_last=2)
FAILED = re.compile(r"Could not save the checkpoint of step (\d+): (.+?)\. Training stopped, and (.+?)\. (.+?)\. ")
needs_small_disk = pytest.mark.skipif(
    not small_disk.available(), reason="no private mount namespace here (unshare --user --mount)"
)


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The last checkpoint of the run the tests break, trained without trouble."""
    out = tmp_path_factory.mktemp("straight") / "run"
    m, t, k = tiny_configs(corpus, out, **SETTINGS)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    return ckpt.latest_checkpoint(out)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_the_checkpoint_size_estimate_covers_a_real_checkpoint(straight: Path):
    estimate, real = checkpoint_bytes(load_config(straight / "config.toml")), _size(straight)
    assert real <= estimate < 1.15 * real, (estimate, real)


@needs_small_disk
@pytest.mark.parametrize("how", ["full", "read-only"])
def test_a_disk_that_fills_or_turns_read_only_during_training(how: str, straight: Path, corpus: Path, tmp_path: Path):
    config = write_config(tmp_path / "run.toml", corpus, tmp_path / "unused", **SETTINGS)
    size = 5 * _size(straight) + (1 << 20)  # room for the checkpoints the run keeps, and then some
    seen = small_disk.run("broken_during_training", tmp_path, size, config=str(config), how=how)
    err = seen["err"]
    assert seen["rc"] == 1 and "Traceback" not in err, err
    found = FAILED.search(err)
    assert found, err
    step, why, partial, kept = int(found.group(1)), found.group(2), found.group(3), found.group(4)
    if how == "full":
        assert why.startswith("the disk is full ("), why
    else:
        assert why.endswith("checkpoints cannot be written (Read-only file system)"), why
    before = f"step_{step - SETTINGS['eval_interval']:08d}"
    assert seen["checkpoints"][-1] == before and seen["intact"]  # the one before is whole
    assert kept.startswith("The last good checkpoint") and kept.endswith(f"{before} is intact"), kept
    assert "--resume" in err
    if how == "full":
        assert partial == "the partial checkpoint was removed" and seen["leftovers"] == []
    else:  # nothing can be removed from a read-only directory; the next run does it
        assert partial == "the partial checkpoint was removed" or "could not be removed" in partial
    assert seen["resume_rc"] == 0, seen["resume_err"]
    assert_same_state(straight, tmp_path / "kept" / "final")


@needs_small_disk
def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(straight: Path, corpus: Path, tmp_path: Path):
    config = write_config(tmp_path / "run.toml", corpus, tmp_path / "unused", **SETTINGS)
    seen = small_disk.run("too_small", tmp_path, 2 * _size(straight), config=str(config))
    err = seen["err"]
    assert seen["rc"] == 1 and "Traceback" not in err, err
    assert "Not enough free space for this run's checkpoints in" in err
    assert "up to 4 are on the disk at once" in err and "lower train.keep_last" in err, err
    assert seen["files"] == [".lock"] and seen["checkpoints"] == []  # nothing written, nothing trained


def test_a_run_directory_removed_under_the_run_ends_it_with_the_paragraph(corpus: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = start(write_config(tmp_path / "run.toml", corpus, out, **SETTINGS))
    wait_until(lambda: ckpt.list_checkpoints(out), "first checkpoint", proc=proc)
    proc.send_signal(signal.SIGSTOP)  # so that nothing is written into it while it goes
    shutil.rmtree(out)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert f"the run directory {out} is gone" in err and "earlier checkpoints went with it" in err, err
    assert not out.exists()  # not made again


def test_a_run_directory_removed_while_old_checkpoints_are_pruned_ends_at_the_next_save(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "run"
    read_state = ckpt.read_state

    def removed_first(path: Path) -> dict:  # the directory goes after the prune listed it
        shutil.rmtree(out, ignore_errors=True)
        return read_state(path)

    monkeypatch.setattr(ckpt, "read_state", removed_first)
    m, t, k = tiny_configs(corpus, out, **SETTINGS)
    with pytest.raises(MlxllmError) as failed:
        train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    assert "Could not save the checkpoint of step 20" in str(failed.value), failed.value
    assert f"the run directory {out} is gone" in str(failed.value), failed.value
    assert not out.exists()


def test_a_file_size_limit_ends_the_first_save_with_the_paragraph(corpus: Path, tmp_path: Path):
    data_mod.prepare(str(corpus), TokenizerConfig(kind="byte"), val_fraction=0.1)  # its cache, written here
    out = tmp_path / "run"
    limit = 200_000  # below the weights' file (about 460 KB), above every other file the run writes

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    config = write_config(tmp_path / "run.toml", corpus, out, **SETTINGS)
    done = subprocess.run(command(config), capture_output=True, text=True, timeout=180, preexec_fn=limited)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Could not save the checkpoint of step 10: a file reached this process's file size limit" in done.stderr
    assert "No earlier checkpoint of this run was saved" in done.stderr
    assert list(ckpt.checkpoint_dir(out).iterdir()) == []  # the partial write removed
