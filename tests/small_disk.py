"""Real small or read-only filesystems for the disk tests, without root: a private mount namespace
(`unshare --user --map-root-user --mount`, where the kernel allows user namespaces) in which a tmpfs of
a given size is mounted, or a directory bind-mounted read-only over itself. The mounts exist only in
that namespace, so the scenario (start the trainer, break the disk under it, mend it, resume) runs
inside it, as this file's main, and writes what it saw as JSON for the test to check.
"""

from __future__ import annotations

import errno
import functools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

NAMESPACE = ["unshare", "--user", "--map-root-user", "--mount"]


@functools.cache
def available() -> bool:
    """Whether a tmpfs can be mounted in a private namespace here (Linux with user namespaces)."""
    if not shutil.which("unshare") or not shutil.which("mount"):
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(
            [*NAMESPACE, "mount", "-t", "tmpfs", "-o", "size=1m", "none", d], capture_output=True, timeout=30
        )
    return probe.returncode == 0


def run(scenario: str, tmp_path: Path, size: int, **args) -> dict:
    """Run `scenario` (a function below) in a namespace where tmp_path/disk is a tmpfs of `size` bytes;
    what it saw. tmp_path/kept, outside the tmpfs, holds what it copied out."""
    disk, record, kept = tmp_path / "disk", tmp_path / "record.json", tmp_path / "kept"
    disk.mkdir()
    kept.mkdir()
    spec = {"disk": str(disk), "size": size, "record": str(record), "kept": str(kept), **args}
    done = subprocess.run(
        [*NAMESPACE, sys.executable, __file__, scenario, json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(record.read_text())


def _fill(disk: Path) -> None:
    """Write zeros until the filesystem is full, down to its last byte."""
    with open(disk / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _trainer_outcome(proc: subprocess.Popen, run_dir: Path) -> dict:
    from mlxllm import checkpoint as ckpt

    _, err = proc.communicate(timeout=300)
    root = ckpt.checkpoint_dir(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    return {
        "rc": proc.returncode,
        "err": err,
        "checkpoints": [p.name for p in ckpt.list_checkpoints(run_dir)],
        "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else [],
        "intact": latest is not None and ckpt.damaged_file(latest) is None,
    }


def broken_during_training(disk: Path, spec: dict) -> dict:
    """Train; once the first checkpoint is written, stop the trainer, break the disk (fill it, or make
    the checkpoints' directory read-only), let it go on; then mend the disk and resume to the end."""
    from mlxllm import checkpoint as ckpt

    from trainer_process import command, start, wait_until

    run_dir = disk / "run"
    config = Path(spec["config"])
    proc = start(config, "--out", str(run_dir), "--resume")
    wait_until(lambda: ckpt.list_checkpoints(run_dir), "first checkpoint", proc=proc)
    proc.send_signal(signal.SIGSTOP)
    root = ckpt.checkpoint_dir(run_dir)
    if spec["how"] == "full":
        _fill(disk)
    else:  # a read-only view of the directory over it, which even root cannot write through
        _mount("--bind", str(root), str(root))
        _mount("-o", "remount,bind,ro", str(root))
    proc.send_signal(signal.SIGCONT)
    record = _trainer_outcome(proc, run_dir)
    if spec["how"] == "full":
        (disk / "filler").unlink()
    else:
        subprocess.run(["umount", str(root)], check=True)
    resumed = subprocess.run(command(config, "--out", str(run_dir), "--resume"), capture_output=True, text=True)
    record.update(resume_rc=resumed.returncode, resume_err=resumed.stderr)
    if resumed.returncode == 0:
        shutil.copytree(ckpt.latest_checkpoint(run_dir), Path(spec["kept"]) / "final")
    return record


def too_small(disk: Path, spec: dict) -> dict:
    """Train on a disk too small for the run's checkpoints."""
    from trainer_process import start

    run_dir = disk / "run"
    record = _trainer_outcome(start(Path(spec["config"]), "--out", str(run_dir)), run_dir)
    record["files"] = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    return record


if __name__ == "__main__":
    name, spec = sys.argv[1], json.loads(sys.argv[2])
    _mount("-t", "tmpfs", "-o", f"size={spec['size']}", "none", spec["disk"])
    outcome = {"broken_during_training": broken_during_training, "too_small": too_small}[name](Path(spec["disk"]), spec)
    Path(spec["record"]).write_text(json.dumps(outcome))
