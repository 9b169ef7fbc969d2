"""The learning-rate schedule: linear warmup, then cosine decay (the default) or warmup-stable-decay
(WSD: the peak held, then a cooldown over the last part of the run), and for WSD the run lengths
whose stable phase ends at a given step, so that a checkpoint there plus a cooldown is a finished
shorter run (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations")."""

from __future__ import annotations

import math

from mlxllm.config import TrainConfig


def cooldown_steps(total_steps: int, fraction: float) -> int:
    """The steps of a WSD run of `total_steps` spent decaying: `fraction` of them, rounded to whole
    steps, at least one."""
    return max(1, round(fraction * total_steps))


def stable_steps(total_steps: int, fraction: float) -> int:
    """The steps of a WSD run of `total_steps` before its cooldown (warmup and stable phase): their
    learning rate does not depend on `total_steps`."""
    return total_steps - cooldown_steps(total_steps, fraction)


def length_for_stable(step: int, fraction: float) -> int:
    """The total steps k of the WSD run whose cooldown starts right after `step` steps (stable_steps(k)
    == step), its cooldown share closest to `fraction`: step / (1 - fraction) when that is a whole number.

    `step`: a positive step count; `fraction`: the cooldown fraction, in (0, 1)."""
    ideal = step / (1 - fraction)
    # stable_steps(k) grows by 0 or 1 as k grows by 1 and stays within 1 of k (1 - fraction),
    # so some k this close to the ideal one hits `step`.
    margin = 2 + math.ceil(1 / (1 - fraction))
    near = range(max(1, math.floor(ideal) - margin), math.ceil(ideal) + margin + 1)
    return min((k for k in near if stable_steps(k, fraction) == step), key=lambda k: abs(k - ideal))


def _cooldown_done(cfg: TrainConfig, step: int, progress: float) -> float:
    """How far into the cooldown this step is: 0 before it, 1 at the end of the run."""
    if cfg.max_tokens is None and cfg.max_seconds is None:
        # A step budget: the cooldown is whole steps, the first one decayed, the last one at the
        # floor, so that the steps before it are the same in every run whose stable phase reaches
        # them (mlxllm.branch relies on it).
        start = stable_steps(cfg.max_steps, cfg.cooldown_fraction)
        return min(1.0, max(0, step + 1 - start) / (cfg.max_steps - start))
    return min(1.0, max(0.0, progress - (1 - cfg.cooldown_fraction)) / cfg.cooldown_fraction)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """The learning rate of optimizer step `step` (0-based), taken when `progress` (the share of the
    run's budget, steps, tokens or seconds, already spent) is done: linear warmup over warmup_steps,
    then cosine from learning_rate down to the floor, or (schedule = "wsd") learning_rate held until
    the last cooldown_fraction of the run and then decayed to the floor, reached as the budget ends."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    floor = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        # The 1-sqrt shape of Hägele et al., who report it ahead of a linear cooldown of the same
        # length and, with a 20% cooldown, level with a cosine run of the same length: it drops
        # fastest at the start and spends three quarters of the cooldown below half the peak
        # (a linear one: half), the low learning rates the cooldown's gain comes from.
        return floor + (cfg.learning_rate - floor) * (1 - math.sqrt(_cooldown_done(cfg, step, progress)))
    return floor + 0.5 * (cfg.learning_rate - floor) * (1 + math.cos(math.pi * min(1.0, progress)))
