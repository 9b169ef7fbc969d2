"""Where the study lives, and keeping it whole when workers die.

The default is a journal file in the search directory; any Optuna storage URL works too. RDB storages get
Optuna's heartbeat (stale trials are failed and retried by Optuna itself). The journal has no heartbeat,
so each trial records the process that runs it, and every start sweeps trials whose process is gone:
they are marked FAIL and re-queued with Optuna's own retry callback.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mlxllm.errors import MlxllmError

JOURNAL_NAME = "study.journal"
OWNER = "worker"  # user attr: {host, pid, start} of the process running the trial
LOST = "lost"  # user attr on a FAIL trial whose run was cut off (dead worker, interrupt): it is retried
HEARTBEAT_S = 30
MAX_RETRY = 3


def default_url(search_dir: Path) -> str:
    return str(search_dir / JOURNAL_NAME)


def open_storage(url: str | None, search_dir: Path) -> optuna.storages.BaseStorage:
    """A journal file (the default, or any path) or an Optuna storage URL such as sqlite:///x.db."""
    url = url or default_url(search_dir)
    try:
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        if url.startswith("redis"):
            return optuna.storages.get_storage(url)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_S, grace_period=4 * HEARTBEAT_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    except Exception as e:  # noqa: BLE001 - drivers raise their own types; all mean "cannot open"
        raise MlxllmError(
            f"Cannot open the study storage {url!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Check the URL (e.g. sqlite:///search.db, postgresql://user@host/db, or a journal file path), that its "
            "folder or server exists and that its database driver is installed; leave --storage out to use a journal "
            "file in the search directory."
        ) from None


def _start_time(pid: int) -> str | None:
    """The process' start time (Linux), so that a reused pid is not taken for the original process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited already


def owner() -> dict[str, Any]:
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
    return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def sweep(study: optuna.Study) -> list[int]:
    """Fail trials left RUNNING by dead processes of this machine and re-queue every lost trial once.

    Returns the numbers of the trials re-queued.
    """
    storage = study._storage  # Optuna's storage API takes trial ids, which only the storage maps
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get(OWNER)
        if who is None or _alive(who):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, LOST, f"worker {who['pid']} on {who['host']} died")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker swept it first
    trials = study.get_trials(deepcopy=False)
    done = retried_numbers(trials)
    requeued = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(LOST) and t.number not in done:
            retry(study, t)
            requeued.append(t.number)
    return requeued


def counts(study: optuna.Study) -> tuple[int, int]:
    """(finished, running): trials that count towards --trials, and those in progress. Lost trials do not count."""
    finished = running = 0
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for t in trials:
        lost = t.state == TrialState.FAIL and (t.user_attrs.get(LOST) or t.number in retried)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and not lost):
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return finished, running


class Gate:
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
