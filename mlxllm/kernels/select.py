"""Which attention implementation runs a shape on this device: what 'auto' means (a recorded benchmark
winner that supports the shape, else a default), and whether a configured one can run at all.

Choices are recorded (`mlxllm bench attention --record`) per Shape: the device, the dtype, the head dim
and whether it trains, which is what decides the fastest. A choice recorded for a whole device (the key is
the device's name alone: what mlxllm wrote before it recorded shapes, or `record_choice` without a shape)
still applies, to the shapes it supports.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxllm.config import ATTENTION_IMPLS
from mlxllm.device import backend, cache_dir, device_name
from mlxllm.distributed import current
from mlxllm.errors import MlxllmError
from mlxllm.kernels.fused import kernel_error
from mlxllm.kernels.fused import unsupported as kernel_unsupported

# What 'auto' may stand for: every implementation but the plain-ops baseline, which is never the faster.
IMPLS = tuple(i for i in ATTENTION_IMPLS if i not in ("auto", "reference"))
# Choices recorded before the two-halves path had its own name call it 'reference': read as what they ran.
_RENAMED = {"reference": "halves"}
_said: set[str] = set()  # the lines say() printed in this process


@dataclass(frozen=True)
class Shape:
    """What decides which attention implementation is fastest, and which can run at all."""

    device: str  # device.device_name(), e.g. 'metal:Apple M2 Max'; its prefix is the backend
    dtype: str  # of q, k and v: 'float32', 'bfloat16' or 'float16'
    head_dim: int
    training: bool  # forward and backward (Metal runs mx.fast's attention unfused then), or forward only

    @property
    def backend(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def key(self) -> str:
        """Its key in attention.json."""
        return f"{self.device}|{self.dtype}|d{self.head_dim}|{'train' if self.training else 'infer'}"

    def describe(self) -> str:
        return f"{self.device}, {self.dtype}, head dim {self.head_dim}, {'training' if self.training else 'inference'}"


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


def default(kind: str) -> str:
    """'auto' with nothing recorded on backend `kind`: on the CPU, mx.fast.scaled_dot_product_attention
    trains slower than the two-halves attention (see `mlxllm bench attention`)."""
    return "halves" if kind == "cpu" else "fast"


def unsupported(impl: str, shape: Shape) -> str | None:
    """Why `impl` cannot run `shape`, or None. Only the fused GPU kernels have limits ('flash' on the CPU is
    their tiled MLX form, which runs any shape)."""
    if impl != "flash" or shape.backend == "cpu":
        return None
    return kernel_unsupported(shape.head_dim, shape.dtype)


def say(line: str) -> None:
    """Print `line` on stderr once per process, on rank 0 of a training group."""
    if line not in _said and current().primary:
        _said.add(line)
        print(line, file=sys.stderr)


def _instead(impl: str, shape: Shape, why: str) -> str:
    say(f"attention: 'auto' does not use the recorded '{impl}' for {shape.describe()}: {why}; using 'fast'.")
    return "fast"


def resolve_auto(shape: Shape | None = None) -> str:
    """What 'auto' means for `shape` (None: for this device as a whole): the choice recorded for the shape,
    else the one for its device, where that supports the shape ('fast' instead, said once); else default()."""
    path = str(cache_path())
    recorded = (
        (_recorded(path, shape.key) or _recorded(path, shape.device)) if shape else _recorded(path, device_name())
    )
    if recorded is None:
        return default(shape.backend if shape else backend())
    why = unsupported(recorded, shape) if shape else None
    return _instead(recorded, shape, why) if why else recorded


KernelProbe = Callable[[str, str, int, int], "str | None"]  # (backend, dtype, head dim, groups) -> error or None


def choose(configured: str, shape: Shape, groups: int, probe: KernelProbe = kernel_error) -> str:
    """The implementation a model runs for model.attention = `configured` on `shape`, checked before it runs
    (not while tracing: `probe` runs the kernels). Where the fused kernels cannot run, for the shape or
    because they do not build (`probe`: fused.kernel_error), 'auto' falls back to 'fast', saying so once, and
    an explicit 'flash' is an MlxllmError. groups: query heads per K/V head."""
    impl = resolve_auto(shape) if configured == "auto" else configured
    if impl != "flash" or shape.backend == "cpu":
        return impl
    why = unsupported(impl, shape)
    error = None if why else probe(shape.backend, shape.dtype, shape.head_dim, groups)
    if why is None and error is None:
        return impl
    if configured == "auto":
        return _instead(impl, shape, why or f"its kernels do not build or run here ({error})")
    if why:
        raise MlxllmError(
            f"model.attention = 'flash' cannot run this model ({shape.describe()}): {why}. Set model.attention "
            "= 'auto' (this device's fastest implementation that supports the model) or 'fast', or choose "
            "d_model and n_heads for a supported head dim."
        )
    raise MlxllmError(
        f"model.attention = 'flash': the fused attention kernels do not build or run on {shape.describe()} "
        f"({error}). Set model.attention = 'auto' or 'fast' (mx.fast.scaled_dot_product_attention); "
        "`mlxllm info` shows the device and MLX version to report with the error."
    )


def record_choice(impl: str, shape: Shape | None = None) -> Path:
    """Store `impl` as what 'auto' means for `shape` (None: for this whole device); returns the file written."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")
    path = cache_path()
    data = _read(path)
    data[shape.key if shape else device_name()] = impl
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    _recorded.cache_clear()
    return path
