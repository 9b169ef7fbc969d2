"""A search shared by several machines through a real PostgreSQL server (started by the test, see postgres_server.py).

Each `mlxllm search run` runs in a process of its own with its own search directory, as it would on its own machine;
only the database is shared.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from mlxllm import MlxllmError  # noqa: E402

from mlxllm_search import search  # noqa: E402
from mlxllm_search.records import LOST  # noqa: E402
from mlxllm_search.storage import GRACE_ENV, HEARTBEAT_ENV, counts, open_storage  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402
from postgres_server import PostgresServer, missing, postgres_server  # noqa: E402
from test_search import cli, write_spec  # noqa: E402

CLI = "import sys; from mlxllm.cli import main; sys.argv[0] = 'mlxllm'; main()"
FINISHED = {TrialState.COMPLETE, TrialState.PRUNED}
HEARTBEAT, GRACE = 1, 5  # seconds: a dead worker's trial is retried within seconds


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    why = missing()
    if why is not None:
        pytest.skip(f"cannot start a PostgreSQL server: {why}")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed (pip install '.[test]')")
    with postgres_server() as server:
        yield server


def worker(spec: Path, out: Path, url: str, trials: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`mlxllm search run` as one machine would run it."""
    args = [
        sys.executable,
        "-c",
        CLI,
        "search",
        "run",
        str(spec),
        "--out",
        str(out),
        "--storage",
        url,
        "--trials",
        str(trials),
        "--quiet",
    ]
    return subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"search worker {proc.pid} did not finish within {timeout} s:\n{out}")
    assert proc.returncode == 0, out
    return out


def load(url: str, tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="t", storage=open_storage(url, tmp_path))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def best_header(out: Path) -> str:
    return (out / "best.toml").read_text().splitlines()[0].split(":", 1)[1]  # "trial N, validation loss X ..."


def two_slow_workers(tmp_path: Path, corpus: Path, url: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two machines' workers on a 3-trial study, with trials of a few seconds and a heartbeat of one second."""
    spec = write_spec(tmp_path, corpus, search='pruner = "none"', budget="amount = 400\neval_interval = 100")
    env = {HEARTBEAT_ENV: str(HEARTBEAT), GRACE_ENV: str(GRACE)}
    a, b = (worker(spec, tmp_path / f"machine{i}", url, trials=3, env=env) for i in range(2))
    return a, b


def running_together(url: str, tmp_path: Path, a: subprocess.Popen, b: subprocess.Popen) -> FrozenTrial:
    """Wait until both workers are training a trial; returns a's."""
    deadline, running = time.time() + 120, {}
    while time.time() < deadline and a.poll() is None and b.poll() is None:
        time.sleep(0.2)
        try:
            live = load(url, tmp_path).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            continue  # the study is not created yet
        # A trial with its learning rate recorded has drawn all its parameters and is training.
        running = {t.user_attrs["worker"]["pid"]: t for t in live if "learning_rate" in t.user_attrs}
        if {a.pid, b.pid} <= running.keys():
            return running[a.pid]
    pytest.fail(f"the two workers were never training trials together (running: {sorted(running)})")


def retry_of(original: FrozenTrial, trials: list[FrozenTrial]) -> FrozenTrial:
    """The one trial that ran the original's parameters again, by Optuna's retry record."""
    retried = [t for t in trials if original.number in t.system_attrs.get("retry_history", [])]
    assert len(retried) == 1, [t.system_attrs for t in trials]
    t = retried[0]
    assert t.params == original.params and t.state in FINISHED and t.number > original.number
    assert t.system_attrs["failed_trial"] == original.number
    return t


def test_workers_on_two_machines_share_one_study_and_lose_no_trial(
    tmp_path: Path, corpus: Path, pg: PostgresServer
) -> None:
    url = pg.create_database("shared")
    spec = write_spec(tmp_path, corpus, search='pruner = "none"', budget="amount = 60\neval_interval = 30")
    # A plain postgresql:// URL and one naming the driver reach the same study.
    urls = [url, url.replace("postgresql://", "postgresql+psycopg://")]
    procs = [worker(spec, tmp_path / f"machine{i}", urls[i], trials=5) for i in range(2)]
    for p in procs:
        finish(p)

    study = load(url, tmp_path)
    trials = study.get_trials()
    assert len(trials) == 5 and {t.state for t in trials} <= FINISHED, [t.state for t in trials]
    assert counts(study) == (5, 0)
    assert {t.user_attrs["worker"]["pid"] for t in trials} == {p.pid for p in procs}  # both machines trained
    assert (
        trials[0].params["n_heads"] == 2
        and sum(t.params["n_heads"] == 2 and t.params["learning_rate"] == 1e-2 for t in trials) == 1
    )  # the base config is queued once
    # The worker that ran out of trials first waited for the other's last one: both report the same winner.
    assert best_header(tmp_path / "machine0") == best_header(tmp_path / "machine1")
    result = cli("search", "report", str(tmp_path / "machine1"))  # the directory names the shared storage
    assert result.exit_code == 0, result.output
    assert (tmp_path / "machine1" / "history.png").stat().st_size > 0


def test_a_killed_worker_is_found_by_its_heartbeat_and_its_trial_is_retried(
    tmp_path: Path, corpus: Path, pg: PostgresServer
) -> None:
    url = pg.create_database("killed")
    doomed, survivor = two_slow_workers(tmp_path, corpus, url)
    # Once both are mid-trial: the survivor has started, so only the heartbeat can find the dead one.
    lost = running_together(url, tmp_path, doomed, survivor)
    doomed.send_signal(signal.SIGKILL)
    killed_at = datetime.datetime.now()
    doomed.wait(timeout=30)
    finish(survivor)

    study = load(url, tmp_path)
    trials = study.get_trials()
    assert TrialState.RUNNING not in {t.state for t in trials}
    failed = trials[lost.number]
    assert failed.state == TrialState.FAIL and not failed.user_attrs.get(LOST)  # failed by the heartbeat, not a sweep
    # Seconds after the kill, as the grace period says (a sweep by process id would have been at once); half of
    # it leaves room for a late last beat on a loaded machine.
    assert failed.datetime_complete >= killed_at + datetime.timedelta(seconds=GRACE / 2)
    retried = retry_of(lost, trials)
    assert retried.user_attrs["worker"]["pid"] == survivor.pid
    assert counts(study) == (3, 0) and len(trials) == 4


def test_a_worker_frozen_past_the_grace_period_moves_on(tmp_path: Path, corpus: Path, pg: PostgresServer) -> None:
    url = pg.create_database("frozen")
    frozen, other = two_slow_workers(tmp_path, corpus, url)
    late = running_together(url, tmp_path, frozen, other)
    frozen.send_signal(signal.SIGSTOP)  # a laptop put to sleep, a machine cut off the network
    try:
        deadline = time.time() + 120
        while load(url, tmp_path).get_trials()[late.number].state == TrialState.RUNNING and time.time() < deadline:
            time.sleep(0.5)
    finally:
        frozen.send_signal(signal.SIGCONT)
    for p in (frozen, other):
        finish(p)  # the late worker found its trial taken over and went on, without an error

    study = load(url, tmp_path)
    trials = study.get_trials()
    assert TrialState.RUNNING not in {t.state for t in trials}
    assert trials[late.number].state == TrialState.FAIL  # its late results were not taken
    retry_of(late, trials)
    assert counts(study) == (3, 0) and len(trials) == 4


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_storage_is_one_clear_error_and_touches_nothing(
    tmp_path: Path, corpus: Path, pg: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_spec(tmp_path, corpus, budget="amount = 20\neval_interval = 10")
    out = tmp_path / "s"
    search(spec, out=out, trials=1, show=False)  # an earlier search (journal) whose files must survive
    before = snapshot(out)
    assert {"study.journal", "search.json", "best.toml"} <= before.keys()

    def refused(storage: str, *words: str) -> str:
        started = time.time()
        with pytest.raises(MlxllmError) as info:
            search(spec, out=out, trials=2, storage=storage, show=False)
        message = str(info.value)
        assert "\n" not in message and all(w in message for w in words), message
        assert time.time() - started < 20  # reported, not waited on
        assert snapshot(out) == before
        return message

    unreachable = f"postgresql://postgres:secret@127.0.0.1:{_closed_port()}/x"
    message = refused(unreachable, "Cannot open the study storage", "127.0.0.1", "Connection refused")
    assert "secret" not in message  # the URL's password is not echoed
    result = cli("search", "run", str(spec), "--out", str(out), "--storage", unreachable)
    assert result.exit_code == 1 and "Cannot open the study storage" in result.output
    assert isinstance(result.exception, SystemExit), result.exception

    monkeypatch.setenv(HEARTBEAT_ENV, "5")
    monkeypatch.setenv(GRACE_ENV, "6")
    refused(pg.url(), "at least twice the heartbeat interval", GRACE_ENV)
    monkeypatch.delenv(HEARTBEAT_ENV)
    monkeypatch.delenv(GRACE_ENV)

    # Without the driver: this server is up, so only the missing import can be to blame.
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)
    for url in (pg.url(), pg.url().replace("postgresql://", "postgresql+psycopg://")):
        refused(url, "PostgreSQL", "driver (psycopg)", "mlxllm[search]")
    result = cli("search", "run", str(spec), "--out", str(out), "--storage", pg.url())
    assert result.exit_code == 1 and "psycopg[binary]" in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert snapshot(out) == before
