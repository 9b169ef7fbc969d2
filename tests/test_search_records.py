"""What the search stores on Optuna's trials, and the one place it uses Optuna's private API (no training: seconds).

A study written before TrialRecord existed must still read, so the stored form is checked key by key; and the
private names storage.write_others_trial relies on are exercised on real journal and SQLite storages, so an
Optuna release that changes them fails here rather than in a search whose worker died.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
# Optuna warns that an RDB heartbeat is meant for Study.optimize: these tests ask and tell by hand.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")

from mlxllm_search.records import LOST, StudyRecord, TrialRecord, record_of  # noqa: E402
from mlxllm_search.speed import Point, Speed  # noqa: E402
from mlxllm_search.storage import beats, open_storage, retried_numbers, sweep, write_others_trial  # noqa: E402
from mlxllm_search.target import Target, TickUnit, make_plan  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

# A target-aware trial's attributes as the search stored them before TrialRecord (keys and JSON forms).
STORED = {
    "worker": {"host": "h", "pid": 12, "start": "99"},
    "lost": None,
    "model": {"n_layers": 1, "d_model": 16},
    "learning_rate": 0.003,
    "params": 5000,
    "run_dir": "searches/x/trials/0000",
    "flops_per_step": 1.5e9,
    "points": [[10, 1.25, 900.0, 3.5, True], [20, 2.5, 1000.0, 3.0, False]],
    "speed": [0.01, 0.2, 0.5],
    "fit": [2.0, 1.5, 0.5, 2, False],
    "fraction": 0.333,
    "steps_at_target": 600.0,
    "predicted": 2.9,
    "predicted_std": 0.2,
    "predictions": {"0.111111": [3.1, 0.4], "0.333333": [2.9, 0.2]},
    "rung": 0.333333,
    "steps": 20,
    "seconds": 4.5,
    "val_loss": 2.9,
    "step_ms": 10.0,
    "memory_gb": 0.1,
    "cut": "search budget spent at 0.333 of the target",
}


def test_a_stored_trial_reads_typed_and_writes_back_as_it_was() -> None:
    r = TrialRecord.from_attrs(json.loads(json.dumps({**STORED, "someone_else": 1})))
    assert r.points == (Point(10, 1.25, 900.0, 3.5, True), Point(20, 2.5, 1000.0, 3.0, False))
    assert r.speed == Speed(0.01, 0.2, 0.5) and r.worker == STORED["worker"] and r.lost is None
    assert r.predictions == {0.111111: (3.1, 0.4), 0.333333: (2.9, 0.2)}
    assert r.confirms is None and r.free is None  # never written
    again = r.to_attrs(STORED)
    assert json.loads(json.dumps(again)) == STORED  # same keys, same JSON: a resumed study reads both ways
    assert LOST == "lost" and "lost" not in r.to_attrs()  # unset fields are left out unless named
    with pytest.raises(KeyError):
        TrialRecord.key("losses")
    assert StudyRecord.from_attrs({"space_hash": "ab", "spec": "s.toml", "objectives": ["val_loss"]}).spec == "s.toml"


def test_ticks_say_their_unit() -> None:
    timed = make_plan(Target("seconds", 300), None, tokens_per_step=512)
    steps = make_plan(Target("tokens", 512_000), None, tokens_per_step=512)
    assert timed.unit is TickUnit.MS and steps.unit is TickUnit.STEPS
    assert timed.unit.at(100, lambda step: step * 0.02) == pytest.approx(2000.0)  # 100 steps of 20 ms
    assert steps.unit.at(100, lambda step: 1 / 0) == 100  # steps need no clock


@pytest.fixture(params=["journal", "sqlite"])
def study(request: pytest.FixtureRequest, tmp_path: Path) -> optuna.Study:
    url = None if request.param == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    assert beats(url) == (request.param == "sqlite")
    return optuna.create_study(study_name="s", storage=open_storage(url, tmp_path))


def test_the_private_optuna_use_still_writes_another_process_trial(study: optuna.Study) -> None:
    study.ask()  # RUNNING; the Trial object is "another process'": only the FrozenTrial is used below
    t = study.get_trials()[0]
    write_others_trial(study, t, TrialRecord(lost="worker 1 on h died", cut="x"))
    assert study.get_trials()[0].user_attrs == {"lost": "worker 1 on h died", "cut": "x"}
    study.tell(t.number, state=TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # what sweep takes for "swept already"
        write_others_trial(study, t, TrialRecord(lost="again"))
    assert record_of(study.get_trials()[0]).lost == "worker 1 on h died"


def test_a_dead_workers_trial_is_swept_failed_and_queued_again(study: optuna.Study) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = int(done.stdout), socket.gethostname()  # a process of this machine that has exited
    study.ask().set_user_attr("worker", {"host": host, "pid": pid, "start": "0"})
    assert sweep(study) == [0]
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and record_of(first).lost == f"worker {pid} on {host} died"
    assert retry.state == TrialState.WAITING and retried_numbers(study.get_trials()) == {0}
    assert sweep(study) == []  # once
