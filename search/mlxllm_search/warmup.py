"""MLX's kernels compiled before the search's clock starts.

On the CPU backend MLX compiles each fused kernel of a compiled step with the system's C++ compiler the first
time it meets it, and keeps the library for later processes (per MLX version). On a machine that never trained
before, the first training call spends tens of seconds there: inside the search's budget, the first trial's
share would go to the compiler, and a short search would measure nothing. Training the base config for a few
steps first, with one evaluation, compiles what every trial uses (the same step and evaluation; a new width or
depth adds a kernel or two); when the kernels are already there it costs a second or two. The search does not
count it in its seconds, and says so when it was long. Its last steps time the base architecture: the fit
planner designs its first trial on that speed instead of a guess from FLOPs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mlxllm.data import TokenData
from mlxllm.trainer import train

import mlx.core as mx

from mlxllm_search.space import Sample, SearchSpec, run_config

WARM_STEPS, WINDOW = 6, 2  # the first step compiles; the speed is the last window's, compiled and warm
SAY_AFTER_S = 5.0  # a warm-up this long was the compiler's first pass on this machine: the search says so


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up took and measured."""

    seconds: float  # 0.0 where none was needed
    tokens_per_sec: float | None = None  # the base's training speed in its last steps (None: not measured)


def needs_warm_up() -> bool:
    """Whether MLX compiles its kernels with the C++ compiler here (its CPU backend); Metal's and CUDA's are
    compiled at their first use too, but in well under a second."""
    return mx.default_device() == mx.cpu


def warm_up(spec: SearchSpec, data: TokenData, search_dir: Path) -> WarmUp:
    """Train the base config for WARM_STEPS steps (WSD, as the fit planner's trials; one evaluation) in a
    scratch folder under `search_dir`, removed after: the seconds it took and the base's speed."""
    if not needs_warm_up():
        return WarmUp(0.0)
    began = time.perf_counter()
    out = search_dir / "warm-up"
    run = run_config(spec, Sample.of(spec.base), out)
    settings = dict(max_steps=WARM_STEPS, max_tokens=None, max_seconds=None, eval_interval=WARM_STEPS)
    cfg = replace(run.train, schedule="wsd", warmup_steps=1, keep_last=1, sample_tokens=0, log_interval=WINDOW)
    try:
        result = train(replace(run, train=replace(cfg, **settings)), overwrite=True, show_progress=False, data=data)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return WarmUp(time.perf_counter() - began, result.tokens_per_sec)


def before_the_clock(spec: SearchSpec, data: TokenData, search_dir: Path, show: bool) -> WarmUp:
    """The warm-up of a search with a time budget (the budget is the trials', not the compiler's first pass),
    said when it was long (`show`); none for a search bounded by its trials alone."""
    if spec.settings.seconds is None:
        return WarmUp(0.0)
    warm = warm_up(spec, data, search_dir)
    if show and warm.seconds > SAY_AFTER_S:
        took = f"{warm.seconds:.0f} s (once)"
        print(f"MLX compiled its kernels for this machine in {took}, outside the search's budget.")
    return warm
