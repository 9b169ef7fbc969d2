"""Where the study lives, and keeping it whole when workers die.

The default is a journal file in the search directory; any Optuna storage URL works too. RDB storages get
Optuna's heartbeat: a trial whose worker stopped beating for the grace period is failed and retried with
Optuna's own retry callback, by whichever worker looks next, on any machine. The journal has no heartbeat,
so each trial records the process that runs it, and every start sweeps trials whose process is gone:
they are marked FAIL and re-queued with the same callback. A PostgreSQL study is shared by machines: its
trial gate is an advisory lock in the database rather than a file in the search directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from mlxllm.errors import MlxllmError

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from mlxllm_search.records import TrialRecord, record_of

JOURNAL_NAME = "study.journal"
# A beat is one small write per worker; four missed beats (a busy machine, a short network outage) before a
# worker is taken for dead, so its trial is retried about two minutes after it died.
HEARTBEAT_S = 30
GRACE_BEATS = 4  # the default grace period, in heartbeats
HEARTBEAT_ENV, GRACE_ENV = "MLXLLM_SEARCH_HEARTBEAT_S", "MLXLLM_SEARCH_GRACE_S"
MAX_RETRY = 3
POLL_S = 2.0  # how often a worker with nothing to start looks again at trials that are still running
CONNECT_TIMEOUT_S = 10  # an unreachable database server is reported, not waited on for minutes
# The module each PostgreSQL driver of SQLAlchemy imports.
PG_DRIVERS = {"psycopg": "psycopg", "psycopg2": "psycopg2", "psycopg2cffi": "psycopg2cffi", "pg8000": "pg8000"}


def default_url(search_dir: Path) -> str:
    return str(search_dir / JOURNAL_NAME)


def _seconds(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise MlxllmError(f"{name} must be a whole number of seconds, at least 1 (got {raw!r}). Fix it or unset it.")
    return int(raw)


def heartbeat() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds for RDB storages; MLXLLM_SEARCH_HEARTBEAT_S and
    MLXLLM_SEARCH_GRACE_S override them (the grace defaults to four beats)."""
    interval = _seconds(HEARTBEAT_ENV, HEARTBEAT_S)
    grace = _seconds(GRACE_ENV, GRACE_BEATS * interval)
    if grace < 2 * interval:
        raise MlxllmError(
            f"The grace period ({GRACE_ENV}={grace}) must be at least twice the heartbeat interval "
            f"({HEARTBEAT_ENV}={interval}), or a live worker whose beat is a little late would have its trial failed. "
            "Raise the one or lower the other."
        )
    return interval, grace


def beats(url: str | None) -> bool:
    """Whether the study storage at `url` has Optuna's heartbeat: open_storage gives it to every storage named
    by a URL (an RDB one); the journal (a path, or no URL) has none."""
    return url is not None and "://" in url


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.partition("://")[0].split("+")[0] in ("postgres", "postgresql")


def shown(url: str) -> str:
    """The URL for messages: without its password."""
    if "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (redis, a typo): nothing to hide
        return url


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def database_url(url: str) -> str:
    """The URL SQLAlchemy should open: plain postgresql:// (whose default driver is psycopg2) names psycopg (v3),
    the driver of the `search` extra, when that is the one installed. A missing driver is one clear error."""
    if not is_postgres(url):
        return url
    scheme, _, rest = url.partition("://")
    driver = scheme.partition("+")[2]
    if not driver:
        if _importable("psycopg"):
            return f"postgresql+psycopg://{rest}"
        if _importable("psycopg2"):
            return f"postgresql://{rest}"
        driver = "psycopg"
    elif driver not in PG_DRIVERS or _importable(PG_DRIVERS[driver]):
        return url  # a driver we do not know is SQLAlchemy's to load (or to report)
    raise MlxllmError(
        f"The study storage {shown(url)} is a PostgreSQL database, but its driver ({PG_DRIVERS[driver]}) cannot be "
        f"imported by this Python ({sys.executable}). Install it with pip install 'mlxllm[search]' (which brings "
        "psycopg) or pip install 'psycopg[binary]', then run the same command again; nothing was changed."
    )


@contextmanager
def _experimental_ok() -> Iterator[None]:
    """Optuna marks its heartbeat and retry API experimental; the search relies on them knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _connect_args(url: str) -> dict[str, Any]:
    return {} if "connect_timeout" in url else {"connect_timeout": CONNECT_TIMEOUT_S}


def _cannot_open(url: str, e: BaseException) -> MlxllmError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return MlxllmError(
        f"Cannot open the study storage {shown(url)!r}: {type(e).__name__}: {first}. "
        "Check the URL (e.g. sqlite:///search.db, postgresql://user@host/db, or a journal file path), that its "
        "folder or server exists and that its database driver is installed; leave --storage out to use a journal "
        "file in the search directory."
    )


def open_storage(url: str | None, search_dir: Path) -> optuna.storages.BaseStorage:
    """A journal file (the default, or any path) or an Optuna storage URL such as sqlite:///x.db."""
    url = url or default_url(search_dir)
    if url.startswith("redis"):
        raise MlxllmError(
            f"The study storage {shown(url)!r} is a Redis URL, which Optuna no longer opens as a storage. Use a "
            "journal file (leave --storage out, or give a path), sqlite:///search.db or postgresql://user@host/db."
        )
    target = database_url(url)
    interval, grace = heartbeat() if beats(url) else (None, None)
    try:
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        # pre-ping: a worker's pooled connections sit idle through a long trial, and a firewall may have cut them.
        engine = {"connect_args": _connect_args(url), "pool_pre_ping": True} if is_postgres(url) else None
        with _experimental_ok():
            return optuna.storages.RDBStorage(
                target,
                engine_kwargs=engine,
                heartbeat_interval=interval,
                grace_period=grace,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
    except Exception as e:  # noqa: BLE001 - drivers raise their own types; all mean "cannot open"
        raise _cannot_open(url, e) from None


def _start_time(pid: int) -> str | None:
    """The process' start time (Linux), so that a reused pid is not taken for the original process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited already


def owner() -> dict[str, Any]:
    """This process, as a trial records the process that runs it (TrialRecord.worker)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _alive(who: dict[str, Any]) -> bool:
    if who.get("host") != socket.gethostname():
        return True  # another machine's process: its storage heartbeat is the judge
    pid = int(who.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_time(pid)
    if Path("/proc").is_dir():
        return start is not None and (who.get("start") is None or start == who["start"])
    return True


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """The numbers of the trials that have been queued again (by Optuna's retry callback)."""
    with _experimental_ok():
        return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def write_others_trial(study: optuna.Study, t: FrozenTrial, record: TrialRecord) -> None:
    """Store `record`'s fields on trial `t`, RUNNING in another process (a dead one), through the study's storage.

    The search's one use of Optuna's private API: a trial's user attributes are written only by the Trial object
    of the process that runs it, and once the trial is FAIL nothing may be written, so the sweep that marks a dead
    worker's trial lost writes it by its storage id. tests/test_search_records.py fails when Optuna changes
    either name. Raises optuna.exceptions.UpdateFinishedTrialError when the trial has finished.
    """
    storage, trial_id = study._storage, t._trial_id
    for key, value in record.to_attrs().items():
        storage.set_trial_user_attr(trial_id, key, value)


def sweep(study: optuna.Study) -> list[int]:
    """Fail trials left RUNNING by dead processes of this machine and re-queue every lost trial once.

    Returns the numbers of the trials re-queued.
    """
    with _experimental_ok():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = record_of(t).worker
        if who is None or _alive(who):
            continue
        try:
            write_others_trial(study, t, TrialRecord(lost=f"worker {who['pid']} on {who['host']} died"))
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker swept it first
    trials = study.get_trials(deepcopy=False)
    done = retried_numbers(trials)
    requeued = []
    for t in trials:
        if t.state == TrialState.FAIL and record_of(t).lost and t.number not in done:
            retry(study, t)
            requeued.append(t.number)
    return requeued


def taken_over(study: optuna.Study) -> bool:
    """Whether this process' latest trial was failed by the heartbeat of another worker and queued again: this
    worker was frozen (a sleeping laptop, a network outage) past the grace period, so its late results are refused."""
    me = owner()
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if record_of(t).worker == me]
    return bool(mine) and mine[-1].state == TrialState.FAIL and mine[-1].number in retried_numbers(trials)


def counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, running): trials that count towards --trials, and those in progress. Lost trials do not count."""
    finished = running = 0
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for t in trials:
        lost = t.state == TrialState.FAIL and (record_of(t).lost or t.number in retried)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and not lost):
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return finished, running


class _Lock:
    """acquire/release, also as `with lock:`; release is a no-op when not held (the objective releases early)."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Gate(_Lock):
    """A lock held from 'is another trial needed?' until that trial exists, so N workers stop at exactly N trials."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class StudyLock(_Lock):
    """The Gate of a PostgreSQL study, for workers on every machine: a session advisory lock named after the study.

    It is taken on a connection of its own, opened for each acquire, so a worker that dies mid-acquire takes its
    lock with it when the server drops the connection, and never blocks the others.
    """

    def __init__(self, url: str, study_name: str):
        import sqlalchemy

        self.url = url
        target = database_url(url)
        try:
            self._engine = sqlalchemy.create_engine(
                target, poolclass=sqlalchemy.pool.NullPool, connect_args=_connect_args(url)
            )
        except Exception as e:  # noqa: BLE001 - a malformed URL or a driver that fails to load
            raise _cannot_open(url, e) from None
        # pg_advisory_lock takes a signed 64-bit key; the prefix keeps clear of other applications' keys.
        digest = hashlib.sha256(f"mlxllm-search\0{study_name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._conn: Any = None

    def acquire(self) -> None:
        import sqlalchemy

        conn = None
        try:
            conn = self._engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
            conn.commit()  # the lock outlives the transaction; an open one would only hold a snapshot
        except sqlalchemy.exc.SQLAlchemyError as e:
            if conn is not None:
                conn.close()
            raise _cannot_open(self.url, e) from None
        self._conn = conn

    def release(self) -> None:
        import sqlalchemy

        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
            conn.commit()
        except sqlalchemy.exc.SQLAlchemyError:
            pass  # the connection is gone, and the server dropped the lock with it
        finally:
            conn.close()


def trial_gate(url: str | None, search_dir: Path, study_name: str) -> Gate | StudyLock:
    """The gate the workers of this study share: in the database for PostgreSQL (workers on several machines),
    a lock file in the search directory otherwise (the workers of this machine)."""
    if url and is_postgres(url):
        return StudyLock(url, study_name)
    return Gate(search_dir / ".trial.lock")


def next_step(study: optuna.Study, target: int, beating: bool) -> Literal["run", "wait", "done"]:
    """Whether a worker starts a trial, waits for running ones or stops; call it holding the gate.

    With a heartbeat (`beating`: beats() of the study's storage URL), trials of dead workers (on any machine)
    are failed and queued again first, and a worker that has nothing to start waits for the running trials
    instead of stopping: one may still fail and need running again. The journal has no heartbeat: its running
    trials are live workers' of this machine, or are swept at the next start, so there the worker stops.
    """
    if beating:
        with _experimental_ok():
            fail_stale_trials(study)
    finished, running = counts(study)
    if finished + running < target:
        return "run"
    return "wait" if beating and running and finished < target else "done"
