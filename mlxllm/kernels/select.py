"""Which attention implementation 'auto' means on this device: a recorded benchmark winner, else a default."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from mlxllm.config import ATTENTION_IMPLS
from mlxllm.device import backend, cache_dir, device_name

# What 'auto' may stand for: every implementation but the plain-ops baseline, which is never the faster.
IMPLS = tuple(i for i in ATTENTION_IMPLS if i not in ("auto", "reference"))
# Choices recorded before the two-halves path had its own name call it 'reference': read as what they ran.
_RENAMED = {"reference": "halves"}


def cache_path() -> Path:
    return cache_dir() / "attention.json"


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.cache
def _recorded(path: str, key: str) -> str | None:
    choice = _read(Path(path)).get(key)
    choice = _RENAMED.get(choice, choice) if isinstance(choice, str) else None
    return choice if choice in IMPLS else None


def resolve_auto() -> str:
    """The recorded choice for this device, else 'fast' on a GPU and 'halves' on the CPU.

    On the CPU, mx.fast.scaled_dot_product_attention trains slower than the two-halves attention (see
    `mlxllm bench attention`).
    """
    choice = _recorded(str(cache_path()), device_name())
    if choice is not None:
        return choice
    return "halves" if backend() == "cpu" else "fast"


def record_choice(impl: str) -> Path:
    """Store `impl` as this device's 'auto' attention; returns the file written."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")
    path = cache_path()
    data = _read(path)
    data[device_name()] = impl
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    _recorded.cache_clear()
    return path
