"""A run stopped by a signal: real trainer processes sent real SIGTERMs save the step they stop at,
say so in one line, exit 128 + 15, and resume bit-exactly; a second signal while saving waits for
the save, a third ends at once; in a data-parallel group a signal to one process stops all of them
after the same step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from mlxllm import RunConfig, train
from mlxllm import checkpoint as ckpt
from mlxllm.signals import Stopped

import pytest
from conftest import tiny_configs
from trainer_process import assert_same_state, command, rows, start, step_of, wait_until, write_config

# Long enough that a signal sent once the first row is logged lands well before the end; no
# evaluation in between, so the only checkpoint is the one the signal asks for.
RUN = dict(max_steps=60, eval_interval=1000, log_interval=5)
STOPPED = re.compile(r"Stopped by SIGTERM at step (\d+): its checkpoint is saved \((.+)\) and the metrics are flushed")


def _straight(corpus: Path, out: Path, **settings) -> Path:
    m, t, k = tiny_configs(corpus, out, **settings)
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
    return ckpt.latest_checkpoint(out)


def _signalled(proc: subprocess.Popen, run_dir: Path, signals: int = 1, env_pause: bool = False) -> None:
    """SIGTERM once the first row is logged; with env_pause, the further signals while the save pauses."""
    wait_until(lambda: rows(run_dir), "first metrics row", proc=proc)
    proc.send_signal(signal.SIGTERM)
    if signals > 1:
        root = ckpt.checkpoint_dir(run_dir)
        # Inside the pause, which follows the weights' write: Python runs a handler once for signals that
        # arrive together during a long C call, so each further signal comes on its own, 0.5 s apart.
        wait_until(lambda: any((p / "model.safetensors").exists() for p in root.glob(".tmp-*")), "save", proc=proc)
        for _ in range(signals - 1):
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)


def test_sigterm_saves_the_step_in_flight_and_resume_continues_bit_exactly(corpus: Path, tmp_path: Path):
    want = _straight(corpus, tmp_path / "straight", **RUN)
    out = tmp_path / "stopped"
    config = write_config(tmp_path / "stopped.toml", corpus, out, **RUN)
    proc = start(config)
    _signalled(proc, out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.count("Stopped by") == 1, err
    found = STOPPED.search(err)
    assert found, err
    step = int(found.group(1))
    assert 5 <= step < RUN["max_steps"]
    saved = ckpt.latest_checkpoint(out)
    assert saved.name == f"step_{step:08d}" and Path(found.group(2)) == saved and step_of(saved) == step
    assert ckpt.damaged_file(saved) is None
    assert rows(out)[-1]["step"] == step  # the steps since the last log, flushed

    resumed = subprocess.run(command(config, "--resume"), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(want, ckpt.latest_checkpoint(out))
    steps = [r["step"] for r in rows(out)]
    assert steps == sorted(set(steps)) and steps[-1] == RUN["max_steps"]


def test_a_second_signal_waits_for_the_save_and_a_third_ends_at_once(corpus: Path, tmp_path: Path):
    want = _straight(corpus, tmp_path / "straight", **RUN)
    pause = {"MLXLLM_PAUSE_AT": "checkpoint:3"}  # each save waits 3 s after its weights are written

    out = tmp_path / "twice"
    config = write_config(tmp_path / "twice.toml", corpus, out, **RUN)
    proc = start(config, env=pause)
    _signalled(proc, out, signals=2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "still stopping; the checkpoint is being saved" in err and STOPPED.search(err), err
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None and ckpt.damaged_file(saved) is None
    resumed = subprocess.run(command(config, "--resume"), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_state(want, ckpt.latest_checkpoint(out))  # nothing lost

    out = tmp_path / "thrice"
    proc = start(write_config(tmp_path / "thrice.toml", corpus, out, **RUN), env=pause)
    _signalled(proc, out, signals=3)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err  # ended by the signal itself, inside the 3 s pause
    assert "SIGTERM again: ending at once" in err
    assert ckpt.list_checkpoints(out) == []  # the save it cut short is not a checkpoint


@pytest.mark.parametrize(
    "signum, said",
    [(signal.SIGTERM, "Stopped by SIGTERM"), (signal.SIGINT, "Interrupted"), (signal.SIGHUP, "Stopped by SIGHUP")],
)
def test_a_signal_just_after_an_evaluation_does_not_save_that_step_again(
    signum: int, said: str, corpus: Path, tmp_path: Path
):
    m, t, k = tiny_configs(corpus, tmp_path / "r", max_steps=40, eval_interval=10)
    before = signal.getsignal(signum)

    def callback(metrics: dict) -> None:  # right after step 10's evaluation and checkpoint
        if metrics["step"] == 10:
            os.kill(os.getpid(), signum)

    with pytest.raises(Stopped, match=f"{said} at step 10: its checkpoint is saved") as stopped:
        train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False, callback=callback)
    assert stopped.value.signum == signum and isinstance(stopped.value, KeyboardInterrupt)
    [saved] = ckpt.list_checkpoints(tmp_path / "r")
    assert step_of(saved) == 10 and ckpt.read_state(saved)["val_loss"] is not None  # the evaluation's own
    assert signal.getsignal(signum) is before  # the handlers are put back


def test_a_signal_to_one_rank_stops_the_whole_group_after_the_same_step(corpus: Path, tmp_path: Path):
    from test_distributed import _free_ports

    want = _straight(corpus, tmp_path / "straight", **RUN)
    out = tmp_path / "pair"
    config = write_config(tmp_path / "pair.toml", corpus, out, **RUN)
    port = _free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    ranks = [start(config, env={"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}) for rank in (0, 1)]
    try:
        wait_until(lambda: rows(out), "first metrics row", proc=ranks[0])
        ranks[1].send_signal(signal.SIGTERM)  # as a scheduler that reaches one machine first would
        errs = [p.communicate(timeout=120)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    assert [p.returncode for p in ranks] == [128 + signal.SIGTERM] * 2, errs
    found = STOPPED.search(errs[0])
    assert found, errs
    step = int(found.group(1))
    assert f"Rank 1 stopped with the group at step {step} (SIGTERM)" in errs[1]
    assert ckpt.latest_checkpoint(out).name == f"step_{step:08d}"

    resumed = subprocess.run(command(config, "--resume"), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    # 2 processes train as 1 to float rounding (in the weights; AdamW's moments amplify it)
    assert_same_state(want, ckpt.latest_checkpoint(out), atol=1e-5, files=("model",))
