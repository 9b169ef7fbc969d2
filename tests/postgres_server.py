"""A throwaway PostgreSQL server for tests: `initdb` in a temporary folder, `pg_ctl` on a free 127.0.0.1 port.

initdb refuses to run as root, so under root the server runs as an unprivileged system user that owns the
folder. Every wait is bounded; the server is stopped and its folder removed however the test ends.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_S = 60
SUPERUSER = "postgres"  # the database role; trust authentication on the loopback only


def find_binary(name: str) -> str | None:
    """`name` on PATH, else in the newest /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    return candidates[-1] if candidates else None


def missing() -> str | None:
    """Why a server cannot be started here, or None when it can."""
    for name in ("initdb", "pg_ctl"):
        if find_binary(name) is None:
            return f"PostgreSQL's {name} is not installed (apt-get install postgresql)"
    if os.geteuid() == 0 and _service_user() is None:
        return "running as root and there is no unprivileged user (postgres or nobody) to run PostgreSQL as"
    return None


def _service_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    root: Path
    port: int
    user: pwd.struct_passwd | None  # who runs the server (None: this process' own user)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL tool as the server's user, bounded in time; its output is kept for the error."""
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        env = {**os.environ, "LC_ALL": "C", "HOME": str(self.root)}
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=self.root, **kwargs
        )

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def _start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        done = self.run(
            find_binary("pg_ctl") or "pg_ctl",
            "start",
            "-w",
            "-t",
            str(TIMEOUT_S),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            opts,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")

    def stop(self) -> None:
        self.run(
            find_binary("pg_ctl") or "pg_ctl", "stop", "-w", "-t", str(TIMEOUT_S), "-m", "fast", "-D", str(self.data)
        )


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running server with trust authentication for the `postgres` role on 127.0.0.1."""
    why = missing()
    if why is not None:
        raise RuntimeError(why)
    user = _service_user() if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its parents are private to root, and the server's user must reach the folder.
    root = Path(tempfile.mkdtemp(prefix="mlxllm-pg-"))
    server = PostgresServer(root, _free_port(), user)
    try:
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        done = server.run(
            find_binary("initdb") or "initdb",
            "-D",
            str(server.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stdout}{done.stderr}")
        for attempt in range(3):  # another process may take the free port before the server binds it
            try:
                server._start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                server.port = _free_port()
        yield server
    finally:
        try:
            if (server.data / "postmaster.pid").exists():
                server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
