"""Progress: a rich live display on a terminal, plain lines otherwise, and metrics.jsonl always."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mlxllm.errors import MlxllmError

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(metrics: dict[str, Any]) -> str:
    parts = [f"step {metrics['step']}"]
    for key, label, fmt in (
        ("loss", "loss", ".4f"),
        ("val_loss", "val", ".4f"),
        ("val_bpb", "bpb", ".3f"),
        ("tokens_per_sec", "tok/s", ",.0f"),
        ("mfu", "MFU", ".1%"),
        ("peak_memory_gb", "mem GB", ".2f"),
    ):
        if metrics.get(key) is not None:
            parts.append(f"{label} {metrics[key]:{fmt}}")
    return " | ".join(parts)


class Reporter:
    """Shows training progress and appends every logged figure to metrics.jsonl."""

    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int = 0, show: bool = True):
        """run_dir None: show, but write no metrics (a data-parallel process other than rank 0)."""
        self.metrics_file = open(Path(run_dir) / "metrics.jsonl", "a") if run_dir is not None else None
        self.show = show
        self.console = Console(stderr=False)
        self.live = show and self.console.is_terminal
        self.last: dict[str, Any] = {}
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def message(self, text: str) -> None:
        if self.show:
            self.console.print(text, highlight=False, soft_wrap=True)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.metrics_file is not None:
            try:
                self.metrics_file.write(json.dumps(metrics) + "\n")
                self.metrics_file.flush()
            except OSError as e:  # a full disk, say: the checkpoints already written are what matters
                raise MlxllmError(
                    f"Could not append to {self.metrics_file.name} at step {metrics['step']}: {e}. Training "
                    "stopped; the checkpoints already written are kept. Free some space (or fix the disk), then "
                    "rerun the same command with --resume."
                ) from None
        self.last.update(metrics)
        if self.live:
            self.progress.update(self.task, completed=metrics["step"], info=_fmt(self.last))
        elif self.show:
            print(_fmt(metrics), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.live:
            self.progress.stop()
        if self.metrics_file is not None:
            self.metrics_file.close()

    def summary(self, rows: dict[str, str]) -> None:
        if not self.show:
            return
        table = Table(title="Training summary", show_header=False)
        for key, value in rows.items():
            table.add_row(key, value)
        self.console.print(table)
