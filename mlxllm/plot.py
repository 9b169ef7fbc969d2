"""`mlxllm plot`: a run's curves from its metrics.jsonl as one PNG: training and validation loss,
validation bits per byte, and tokens/s, each against steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxllm.errors import MlxllmError


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is left out."""
    if not path.is_file():
        raise MlxllmError(f"{path} does not exist: plot a run directory that `mlxllm train` wrote.")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows:
        raise MlxllmError(f"{path} holds no metrics yet. Train for at least one log interval first.")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(metrics: str | Path, png: str | Path) -> Path:
    """Draw the run's curves into png; returns its path."""
    rows = read_metrics(Path(metrics))
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed or wanted
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxllmError("Plotting needs matplotlib: pip install 'mlxllm[export]' (or matplotlib).") from None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss")):
        axes[0].plot(*_series(rows, key), label=label, marker="." if key == "val_loss" else None)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(*_series(rows, "val_bpb"), marker=".", color="C2")
    axes[1].set_ylabel("validation bits per byte")
    axes[2].plot(*_series(rows, "tokens_per_sec"), color="C3")
    axes[2].set_ylabel("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
