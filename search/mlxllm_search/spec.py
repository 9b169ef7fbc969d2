"""The search spec: a TOML file with a [base] run config, a [space] to search, a [budget] per trial or a
[target] to optimise for, and [search] settings, read and checked; every problem is an MlxllmError that
says what to change."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from mlxllm.config import RunConfig, apply_overrides, load_config, read_toml
from mlxllm.errors import MlxllmError

from mlxllm_search.regularisers import REGULARISERS, regulariser
from mlxllm_search.space import (
    BUDGET_KINDS,
    CAPS,
    OBJECTIVES,
    PRUNERS,
    SAMPLERS,
    SPACE_KEYS,
    Budget,
    Caps,
    Choice,
    Dimension,
    Range,
    SearchSpec,
    Settings,
    Space,
)
from mlxllm_search.target import PLANNERS, RUNG_SETTINGS, TARGET_KINDS, Target

UNLIMITED_TRIALS = 10**6
TARGET_KEYS = (*TARGET_KINDS, *RUNG_SETTINGS, "planner", "max_2sd", "switch_sd")
SIZE_KEYS = ("n_layers", "head_dim", "n_heads")  # the [space] dimensions that are whole numbers


def _dimension(key: str, v: Any, integer: bool, where: str) -> Dimension:
    if isinstance(v, list):
        if not v:
            raise MlxllmError(
                f"[space] {key} in {where} is an empty list: give at least one choice, e.g. {key} = [2, 4]."
            )
        if any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not isinstance(x, int)) or x <= 0
            for x in v
        ):
            kind = "positive integers" if integer else "positive numbers"
            raise MlxllmError(f"[space] {key} in {where} must list {kind} (got {v}).")
        return Choice(tuple(dict.fromkeys(v)))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _dimension(key, [v], integer, where)
    if isinstance(v, dict):
        unknown = set(v) - {"min", "max", "log"}
        if unknown or "min" not in v or "max" not in v:
            raise MlxllmError(
                f"[space] {key} in {where} must be a list of choices or a table "
                f"{{ min = .., max = .., log = false }} (got {v})."
            )
        low, high = v["min"], v["max"]
        if integer and not (isinstance(low, int) and isinstance(high, int)):
            raise MlxllmError(
                f"[space] {key} in {where} is a whole number: min and max must be integers (got {low}, {high})."
            )
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float))) or low <= 0:
            raise MlxllmError(f"[space] {key} in {where} needs positive numbers for min and max (got {low}, {high}).")
        if low > high:
            raise MlxllmError(f"[space] {key} in {where} has min {low} > max {high}: the range is empty. Swap them.")
        return Range(
            float(low) if not integer else low, float(high) if not integer else high, bool(v.get("log", False)), integer
        )
    raise MlxllmError(f"[space] {key} in {where} must be a list of choices or a {{ min, max }} table (got {v!r}).")


def _table(d: dict[str, Any], name: str, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    t = d.get(name, {})
    if not isinstance(t, dict):
        raise MlxllmError(f"[{name}] in {where} must be a table.")
    unknown = sorted(set(t) - set(keys))
    if unknown:
        raise MlxllmError(f"Unknown key(s) {', '.join(unknown)} in [{name}] of {where}. Valid keys: {', '.join(keys)}.")
    return t


def _base(d: dict[str, Any], path: Path | None, where: str) -> RunConfig:
    t = _table(d, "base", ("config", "model", "tokenizer", "train"), where)
    if "config" in t:
        cfg = Path(t["config"])
        cfg = cfg if cfg.is_absolute() or path is None else path.parent / cfg
        base = load_config(cfg).to_dict()
    else:
        base = load_config(None).to_dict()
    for section in ("model", "tokenizer", "train"):
        base[section].update(t.get(section, {}))
    return RunConfig.from_dict(apply_overrides(base, []))


def _absolute(data: str | None, path: Path | None) -> str | None:
    """Corpus paths made absolute (relative ones from the spec file's folder if not from here), so runs work
    from anywhere."""
    if data is None or Path(data).is_absolute():
        return data
    for root in (Path.cwd(), path.parent if path else None):
        if root is not None and (root / data).exists():
            return str((root / data).resolve())
    return data


def _space(d: dict[str, Any], where: str) -> Space:
    s = _table(d, "space", SPACE_KEYS, where)
    for key in SIZE_KEYS:
        if key not in s:
            raise MlxllmError(
                f"[space] in {where} has no {key}: give its choices (e.g. {key} = [2, 4]) or a {{ min, max }} range."
            )
    dims = {
        k: regulariser(k, s[k], where) if k in REGULARISERS else _dimension(k, s[k], k in SIZE_KEYS, where)
        for k in s
        if k != "kv_group"
    }
    kv = s.get("kv_group", [1])
    kv = [kv] if isinstance(kv, int) else kv
    if not isinstance(kv, list) or not kv or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in kv):
        raise MlxllmError(
            f"[space] kv_group in {where} must list positive integers, query heads per KV head (got {kv!r}); "
            "1 is plain multi-head attention."
        )
    space = Space(kv_group=tuple(dict.fromkeys(kv)), **dims)
    odd = [h for h in space.head_dim.candidates() if h % 2]
    if odd or (isinstance(space.head_dim, Range) and space.head_dim.low != space.head_dim.high):
        if isinstance(space.head_dim, Range):
            raise MlxllmError(
                f"[space] head_dim in {where} must be a list of even sizes (rotary embeddings need even head "
                "dims), e.g. head_dim = [16, 32], not a range."
            )
        raise MlxllmError(
            f"[space] head_dim in {where} holds odd sizes {odd}: rotary embeddings need even head dims. "
            "Use e.g. head_dim = [16, 32]."
        )
    heads = (
        space.n_heads.candidates()
        if isinstance(space.n_heads, Choice) or space.n_heads.high - space.n_heads.low <= 64
        else []
    )
    lonely = [h for h in heads if not space.kv_groups(h)]
    if lonely:
        raise MlxllmError(
            f"[space] in {where}: no kv_group in {list(space.kv_group)} divides n_heads = {lonely}, so those "
            "head counts cannot be built. "
            "Add 1 to kv_group (plain multi-head attention) or drop those head counts."
        )
    if isinstance(space.n_heads, Range) and 1 not in space.kv_group:
        raise MlxllmError(
            f"[space] in {where}: with a wide n_heads range, kv_group must include 1 so that every head count "
            "can be built."
        )
    return space


def _budget(d: dict[str, Any], base: RunConfig, where: str) -> Budget:
    b = _table(d, "budget", ("kind", "amount", "eval_interval"), where)
    kind, amount = b.get("kind", "steps"), b.get("amount")
    if kind not in BUDGET_KINDS:
        raise MlxllmError(f"[budget] kind in {where} must be one of {', '.join(BUDGET_KINDS)} (got {kind!r}).")
    if amount is None:
        amount = {"steps": base.train.max_steps, "tokens": base.train.max_tokens, "seconds": base.train.max_seconds}[
            kind
        ]
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
        raise MlxllmError(f"[budget] amount in {where} must be a positive number of {kind} (got {amount!r}).")
    eval_interval = b.get("eval_interval", base.train.eval_interval)
    if not isinstance(eval_interval, int) or eval_interval < 1:
        raise MlxllmError(
            f"[budget] eval_interval in {where} must be a positive number of steps (got {eval_interval!r})."
        )
    return Budget(kind, amount, eval_interval)


def _objectives(t: dict[str, Any], where: str) -> tuple[str, ...]:
    objectives = t.get("objectives", ["val_loss"])
    objectives = [objectives] if isinstance(objectives, str) else list(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or "val_loss" not in objectives or len(set(objectives)) != len(objectives):
        raise MlxllmError(
            f"[search] objectives in {where} must include val_loss, once, plus any of "
            f"{', '.join(o for o in OBJECTIVES if o != 'val_loss')} "
            f"(got {objectives})."
        )
    return ("val_loss", *(o for o in objectives if o != "val_loss"))


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def check_planner(planner: Any, where: str) -> str:
    """A planner name, checked (see target.PLANNERS); `where`: the setting, as the message names it."""
    if planner not in PLANNERS:
        raise MlxllmError(
            f"{where} must be one of {', '.join(PLANNERS)} (got {planner!r}): fit plans the run from a "
            "scaling law fitted across trials, curves from each trial's own learning curve, auto chooses."
        )
    return planner


def make_target(
    kind: str,
    amount: Any,
    where: str = "the command line",
    planner: Any = "auto",
    max_2sd: Any = 0.5,
    switch_sd: Any = 2.0,
    **rungs: Any,
) -> Target:
    """A checked Target: `amount` of `kind` (seconds, steps or tokens), the planner, the widest 2 sd the fit
    planner acts on, by how many sd its pick must beat the base, and optional rung settings."""
    check_planner(planner, f"[target] planner in {where}" if where != "the command line" else "--planner")
    if not _positive(max_2sd):
        raise MlxllmError(
            f"[target] max_2sd in {where} is the widest 2 sd (in nats) of a predicted loss the fit planner acts on: "
            f"a positive number such as 0.5 (got {max_2sd!r})."
        )
    if isinstance(switch_sd, bool) or not isinstance(switch_sd, (int, float)) or not 0 <= switch_sd < math.inf:
        raise MlxllmError(
            f"[target] switch_sd in {where} is how many sd of the difference the fit planner's pick must beat the "
            f"base architecture by before it replaces it: a number >= 0 such as 2, 0 to take the pick as it is "
            f"(got {switch_sd!r})."
        )
    if kind not in TARGET_KINDS:
        raise MlxllmError(f"The target in {where} must be given in one of {', '.join(TARGET_KINDS)} (got {kind!r}).")
    if not _positive(amount) or (kind != "seconds" and not float(amount).is_integer()):
        unit = "a positive number of seconds" if kind == "seconds" else f"a positive whole number of {kind}"
        raise MlxllmError(f"The target in {where} must be {unit} (got {amount!r}).")
    for key in ("min_fraction", "max_fraction", "confirm_fraction"):
        v = rungs.get(key)
        if v is not None and not (_positive(v) and v <= 1):
            raise MlxllmError(f"[target] {key} in {where} is a fraction of the target: a number in (0, 1] (got {v!r}).")
    top = rungs.get("confirm_top", 2)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise MlxllmError(
            f"[target] confirm_top in {where} must be a whole number, 0 for no confirmation (got {top!r})."
        )
    if rungs.get("confirm_fraction") is not None and rungs["confirm_fraction"] <= (rungs.get("max_fraction") or 0):
        raise MlxllmError(
            f"[target] confirm_fraction in {where} must be above max_fraction: confirmations train further."
        )
    return Target(
        kind,
        float(amount) if kind == "seconds" else int(amount),
        rungs.get("min_fraction"),
        rungs.get("max_fraction"),
        top,
        rungs.get("confirm_fraction"),
        planner,
        any(rungs.get(k) is not None for k in RUNG_SETTINGS),
        float(max_2sd),
        float(switch_sd),
    )


def _target(d: dict[str, Any], where: str) -> Target | None:
    if "target" not in d:
        return None
    t = _table(d, "target", TARGET_KEYS, where)
    kinds = [k for k in TARGET_KINDS if k in t]
    if len(kinds) != 1:
        raise MlxllmError(
            f"[target] in {where} needs exactly one of {', '.join(TARGET_KINDS)}, e.g. seconds = 300 "
            f"(got {', '.join(kinds) or 'none'})."
        )
    if "budget" in d:
        raise MlxllmError(
            f"{where} has both [target] and [budget]: a target-aware search trains each trial to rungs "
            "that are fractions of the target. Remove [budget] (the final run's evaluation interval is "
            "[base.train] eval_interval)."
        )
    return make_target(kinds[0], t[kinds[0]], where, **{k: v for k, v in t.items() if k not in TARGET_KINDS})


def _settings(d: dict[str, Any], where: str, targeted: bool = False) -> Settings:
    t = _table(
        d, "search", ("objectives", "pruner", "sampler", "trials", "seed", "caps", "startup_trials", "seconds"), where
    )
    for key, valid in (("pruner", PRUNERS), ("sampler", SAMPLERS)):
        if t.get(key, valid[0]) not in valid:
            raise MlxllmError(f"[search] {key} in {where} must be one of {', '.join(valid)} (got {t[key]!r}).")
    caps_d = t.get("caps", {})
    if not isinstance(caps_d, dict) or set(caps_d) - set(CAPS):
        raise MlxllmError(f"[search.caps] in {where} takes {', '.join(CAPS)} (got {caps_d!r}).")
    if any(not isinstance(v, (int, float)) or v <= 0 for v in caps_d.values()):
        raise MlxllmError(f"[search.caps] in {where} must be positive numbers (got {caps_d}).")
    if "params" in caps_d:
        caps_d = {**caps_d, "params": int(caps_d["params"])}
    seconds = t.get("seconds")
    if seconds is not None and not _positive(seconds):
        raise MlxllmError(
            f"[search] seconds in {where} is the search's own budget: a positive number (got {seconds!r})."
        )
    trials = t.get("trials", 20 if seconds is None else UNLIMITED_TRIALS)  # a time budget alone ends the search
    if not isinstance(trials, int) or trials < 1:
        raise MlxllmError(f"[search] trials in {where} must be a positive integer (got {trials!r}).")
    startup = t.get("startup_trials", 10)
    if not isinstance(startup, int) or startup < 0:
        raise MlxllmError(f"[search] startup_trials in {where} must be a non-negative integer (got {startup!r}).")
    # Rungs of a target: one bracket of successive halving keeps a time budget; Hyperband's last bracket trains
    # every one of its trials to the longest rung.
    pruner = t.get("pruner", "successive-halving" if targeted else "hyperband")
    return Settings(
        _objectives(t, where),
        pruner,
        t.get("sampler", "tpe"),
        trials,
        t.get("seed"),
        Caps(**caps_d),
        startup,
        None if seconds is None else float(seconds),
    )


def parse_spec(d: dict[str, Any], path: Path | None = None, *, data: str | None = None) -> SearchSpec:
    """Validate a search spec (as read from TOML); every problem is an MlxllmError saying what to change."""
    where = str(path) if path else "the search spec"
    unknown = sorted(set(d) - {"name", "base", "space", "budget", "target", "search"})
    if unknown:
        raise MlxllmError(
            f"Unknown table(s) or key(s) {', '.join(unknown)} in {where}. "
            "Valid: name, [base], [space], [budget] or [target], [search]."
        )
    base = _base(d, path, where)
    base = replace(
        base, train=replace(base.train, data=_absolute(str(data) if data is not None else base.train.data, path))
    )
    space = _space(d, where)
    target = _target(d, where)
    budget = _budget(d, base, where)
    base = replace(base, train=budget.apply(base.train) if target is None else target.apply(base.train))
    settings = _settings(d, where, targeted=target is not None)
    spec = SearchSpec(
        d.get("name") or (path.stem if path else "search"), base, space, budget, settings, str(path or ""), target
    )
    if target is not None:
        spec.plan  # noqa: B018 - refuses, before anything runs, rungs the target or the search budget cannot hold
        return spec
    steps = budget.steps(spec.tokens_per_step)
    if steps is not None and steps < budget.eval_interval:
        raise MlxllmError(
            f"The budget of {budget.amount:g} {budget.kind} ({steps} steps of {spec.tokens_per_step:,} tokens) is "
            f"shorter than one evaluation interval ({budget.eval_interval} steps), so no trial would be evaluated "
            "before it ends and nothing could be pruned. Raise [budget] amount or lower [budget] eval_interval."
        )
    return spec


def with_target(
    spec: SearchSpec, target: Target | None, search_seconds: float | None, planner: str | None = None
) -> SearchSpec:
    """The spec with the command line's target, search budget and planner (each None: the spec's own)."""
    if search_seconds is not None:
        if not _positive(search_seconds):
            raise MlxllmError(f"--search-seconds must be a positive number of seconds (got {search_seconds!r}).")
        # The time budget given now ends the search (or --trials, when given too).
        spec = replace(spec, settings=replace(spec.settings, seconds=float(search_seconds), trials=UNLIMITED_TRIALS))
    if target is not None:
        old = spec.target
        if old is not None:  # the spec's rung settings stay unless the target changes kind
            target = replace(old, kind=target.kind, amount=target.amount) if old.kind == target.kind else target
            target = replace(target, planner=old.planner)
        spec = replace(spec, target=target, base=replace(spec.base, train=target.apply(spec.base.train)))
    if planner is not None:
        check_planner(planner, "--planner")
        if spec.target is None:
            raise MlxllmError(
                "--planner chooses how a target-aware search predicts the loss at the target: give a target too "
                "(--target-seconds, --target-steps or --target-tokens, or [target] in the spec)."
            )
        spec = replace(spec, target=replace(spec.target, planner=planner))
    spec.plan  # noqa: B018 - checked now: refused before any study or training
    return spec


def load_spec(path: str | Path, *, data: str | None = None) -> SearchSpec:
    """Read a search spec TOML (see configs/search/)."""
    path = Path(path)
    d = read_toml(path, "Search spec", "configs/search/ has examples (tiny.toml, shakespeare.toml).")
    return parse_spec(d, path, data=data)
