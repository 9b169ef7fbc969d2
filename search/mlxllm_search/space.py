"""The search spec: a TOML file with a [base] run config, a [space] to search, a [budget] and [search] settings.

The space is valid by construction: d_model is head_dim * n_heads, so heads always divide it, and
n_kv_heads is n_heads / kv_group with only the groups that divide n_heads on offer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from mlxllm.config import RunConfig, apply_overrides, load_config
from mlxllm.errors import MlxllmError
from mlxllm.model import ModelConfig
from mlxllm.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    import optuna

# name: (direction, what it measures)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "val_loss": ("minimize", "validation loss at the end of the budget"),
    "params": ("minimize", "parameter count"),
    "step_ms": ("minimize", "measured training-step latency in ms"),
    "gen_tokens_per_sec": ("maximize", "measured generation speed in tokens/s"),
    "memory_gb": ("minimize", "measured peak memory in GB"),
}
PRUNERS = ("hyperband", "median", "successive-halving", "none")
SAMPLERS = ("tpe", "random")
BUDGET_KINDS = ("steps", "tokens", "seconds")
CAPS = ("params", "memory_gb", "step_ms")
SPACE_KEYS = ("n_layers", "head_dim", "n_heads", "kv_group", "mlp_ratio", "learning_rate")
# Bytes per parameter that training holds at least: weights, gradients and AdamW's two moments in float32.
TRAIN_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        return list(self.values)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def contains(self, v: Any) -> bool:
        return any(v == c for c in self.values)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def candidates(self) -> list[Any]:
        # Parameter count grows with every searched size, so the low end bounds the cheapest model.
        if self.integer and self.high - self.low <= 64:
            return list(range(int(self.low), int(self.high) + 1))
        return [int(self.low) if self.integer else self.low]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, v: Any) -> bool:
        return self.low <= v <= self.high and (not self.integer or float(v).is_integer())


Dimension = Union[Choice, Range]


@dataclass(frozen=True)
class Space:
    n_layers: Dimension
    head_dim: Dimension
    n_heads: Dimension
    kv_group: tuple[int, ...] = (1,)  # query heads per KV head
    mlp_ratio: Dimension | None = None  # None: the base config's
    learning_rate: Dimension | None = None  # None: the base config's

    @staticmethod
    def kv_name(n_heads: int) -> str:
        # A categorical's choices cannot change between trials, so each head count has its own parameter.
        return f"kv_group[n_heads={n_heads}]"

    def kv_groups(self, n_heads: int) -> list[int]:
        return [g for g in self.kv_group if n_heads % g == 0]

    def suggest(self, trial: optuna.Trial, base: RunConfig) -> tuple[ModelConfig, float]:
        """Sample one architecture (and learning rate); every sample builds."""
        n_layers = self.n_layers.suggest(trial, "n_layers")
        head_dim = self.head_dim.suggest(trial, "head_dim")
        n_heads = self.n_heads.suggest(trial, "n_heads")
        groups = self.kv_groups(n_heads)
        group = trial.suggest_categorical(self.kv_name(n_heads), groups) if len(groups) > 1 else groups[0]
        mlp_ratio = self.mlp_ratio.suggest(trial, "mlp_ratio") if self.mlp_ratio else base.model.mlp_ratio
        lr = self.learning_rate.suggest(trial, "learning_rate") if self.learning_rate else base.train.learning_rate
        return self.build(base.model, n_layers, head_dim, n_heads, group, mlp_ratio), lr

    @staticmethod
    def build(base: ModelConfig, n_layers: int, head_dim: int, n_heads: int, group: int, mlp_ratio: float) -> ModelConfig:
        return replace(base, n_layers=n_layers, d_model=head_dim * n_heads, n_heads=n_heads,
                       n_kv_heads=n_heads // group, ffn_dim=None, mlp_ratio=mlp_ratio)

    def params_of(self, run: RunConfig) -> dict[str, Any] | None:
        """The trial parameters that reproduce a run config, or None if the space does not hold it."""
        m = run.model
        group = m.n_heads // m.kv_heads
        p: dict[str, Any] = {"n_layers": m.n_layers, "head_dim": m.head_dim, "n_heads": m.n_heads}
        if not all(getattr(self, k).contains(v) for k, v in p.items()) or group not in self.kv_groups(m.n_heads):
            return None
        if m.ffn_dim is not None and m.ffn_dim != m.hidden_dim:
            return None
        if len(self.kv_groups(m.n_heads)) > 1:
            p[self.kv_name(m.n_heads)] = group
        for name, dim, value in (("mlp_ratio", self.mlp_ratio, m.mlp_ratio), ("learning_rate", self.learning_rate, run.train.learning_rate)):
            if dim is not None:
                if not dim.contains(value):
                    return None
                p[name] = value
        return p

    def architectures(self, base: ModelConfig) -> list[ModelConfig]:
        """Every architecture the space holds (ranges at their cheapest end), for checks before training."""
        ratios = self.mlp_ratio.candidates() if self.mlp_ratio else [base.mlp_ratio]
        out = []
        for n_layers, head_dim, n_heads, ratio in itertools.product(
            self.n_layers.candidates(), self.head_dim.candidates(), self.n_heads.candidates(), ratios
        ):
            out += [self.build(base, n_layers, head_dim, n_heads, g, ratio) for g in self.kv_groups(n_heads)]
        return out


@dataclass(frozen=True)
class Budget:
    kind: str = "steps"
    amount: float = 1000
    eval_interval: int = 100

    def apply(self, train: TrainConfig) -> TrainConfig:
        """The same budget for every trial: one of steps, tokens or seconds, nothing else stops it early."""
        huge = 10**9
        return replace(
            train,
            max_steps=int(self.amount) if self.kind == "steps" else huge,
            max_tokens=int(self.amount) if self.kind == "tokens" else None,
            max_seconds=float(self.amount) if self.kind == "seconds" else None,
            eval_interval=self.eval_interval,
            log_interval=min(train.log_interval, self.eval_interval),
        )

    def steps(self, tokens_per_step: int) -> int | None:
        """Optimizer steps per trial, or None when the budget is time."""
        if self.kind == "steps":
            return int(self.amount)
        if self.kind == "tokens":
            return math.ceil(self.amount / tokens_per_step)
        return None


@dataclass(frozen=True)
class Caps:
    params: int | None = None
    memory_gb: float | None = None
    step_ms: float | None = None

    def items(self) -> list[tuple[str, float]]:
        return [(k, v) for k, v in asdict(self).items() if v is not None]


@dataclass(frozen=True)
class Settings:
    objectives: tuple[str, ...] = ("val_loss",)
    pruner: str = "hyperband"
    sampler: str = "tpe"
    trials: int = 20
    seed: int | None = None
    caps: Caps = field(default_factory=Caps)
    startup_trials: int = 10  # TPE samples at random until this many trials have finished (Optuna's default)

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1


@dataclass(frozen=True)
class SearchSpec:
    name: str
    base: RunConfig  # with the budget applied
    space: Space
    budget: Budget
    settings: Settings
    source: str = ""

    @property
    def tokens_per_step(self) -> int:
        t = self.base.train
        return t.batch_size * (t.seq_len or self.base.model.max_seq_len) * t.grad_accum

    def space_hash(self) -> str:
        """What makes trials comparable: the space, the fixed config, budget and objectives."""
        d = {"space": asdict(self.space), "base": self.base.to_dict(), "budget": asdict(self.budget),
             "objectives": list(self.settings.objectives)}
        d["base"]["train"].pop("out_dir")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check(self, vocab_size: int) -> list[ModelConfig]:
        """The architectures within the caps that can be checked before training; an error if there are none."""
        archs = [replace(m, vocab_size=vocab_size) for m in self.space.architectures(self.base.model)]
        caps = self.settings.caps
        fits = archs
        if caps.params is not None:
            fits = [m for m in fits if m.num_params() <= caps.params]
            if not fits:
                raise MlxllmError(
                    f"No architecture in the search space fits the parameter cap of {caps.params:,}: the smallest has "
                    f"{min(m.num_params() for m in archs):,} parameters (with the tokenizer's {vocab_size} tokens). "
                    "Raise [search.caps] params or make the space smaller (fewer layers, heads or head_dim)."
                )
        if caps.memory_gb is not None:
            low = min(m.num_params() for m in fits) * TRAIN_BYTES_PER_PARAM / 1e9
            if low > caps.memory_gb:
                raise MlxllmError(
                    f"No architecture in the search space can train within the memory cap of {caps.memory_gb} GB: "
                    f"weights, gradients and optimizer state of the smallest alone take {low:.3f} GB. "
                    "Raise [search.caps] memory_gb or make the space smaller."
                )
        return fits


def _dimension(key: str, v: Any, integer: bool, where: str) -> Dimension:
    if isinstance(v, list):
        if not v:
            raise MlxllmError(f"[space] {key} in {where} is an empty list: give at least one choice, e.g. {key} = [2, 4].")
        if any(isinstance(x, bool) or not isinstance(x, (int, float)) or (integer and not isinstance(x, int)) or x <= 0 for x in v):
            kind = "positive integers" if integer else "positive numbers"
            raise MlxllmError(f"[space] {key} in {where} must list {kind} (got {v}).")
        return Choice(tuple(dict.fromkeys(v)))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _dimension(key, [v], integer, where)
    if isinstance(v, dict):
        unknown = set(v) - {"min", "max", "log"}
        if unknown or "min" not in v or "max" not in v:
            raise MlxllmError(f"[space] {key} in {where} must be a list of choices or a table {{ min = .., max = .., log = false }} (got {v}).")
        low, high = v["min"], v["max"]
        if integer and not (isinstance(low, int) and isinstance(high, int)):
            raise MlxllmError(f"[space] {key} in {where} is a whole number: min and max must be integers (got {low}, {high}).")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float))) or low <= 0:
            raise MlxllmError(f"[space] {key} in {where} needs positive numbers for min and max (got {low}, {high}).")
        if low > high:
            raise MlxllmError(f"[space] {key} in {where} has min {low} > max {high}: the range is empty. Swap them.")
        return Range(float(low) if not integer else low, float(high) if not integer else high, bool(v.get("log", False)), integer)
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
    run = RunConfig.from_dict(apply_overrides(base, []))
    return run


def _absolute(data: str | None, path: Path | None) -> str | None:
    """Corpus paths made absolute (relative ones from the spec file's folder if not from here), so runs work from anywhere."""
    if data is None or Path(data).is_absolute():
        return data
    for root in (Path.cwd(), path.parent if path else None):
        if root is not None and (root / data).exists():
            return str((root / data).resolve())
    return data


def parse_spec(d: dict[str, Any], path: Path | None = None, *, data: str | None = None) -> SearchSpec:
    """Validate a search spec (as read from TOML); every problem is an MlxllmError saying what to change."""
    where = str(path) if path else "the search spec"
    unknown = sorted(set(d) - {"name", "base", "space", "budget", "search"})
    if unknown:
        raise MlxllmError(f"Unknown table(s) or key(s) {', '.join(unknown)} in {where}. Valid: name, [base], [space], [budget], [search].")
    base = _base(d, path, where)
    base = replace(base, train=replace(base.train, data=_absolute(str(data) if data is not None else base.train.data, path)))

    s = _table(d, "space", SPACE_KEYS, where)
    for key in ("n_layers", "head_dim", "n_heads"):
        if key not in s:
            raise MlxllmError(f"[space] in {where} has no {key}: give its choices (e.g. {key} = [2, 4]) or a {{ min, max }} range.")
    dims = {k: _dimension(k, s[k], k != "mlp_ratio" and k != "learning_rate", where) for k in s if k != "kv_group"}
    kv = s.get("kv_group", [1])
    kv = [kv] if isinstance(kv, int) else kv
    if not isinstance(kv, list) or not kv or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in kv):
        raise MlxllmError(f"[space] kv_group in {where} must list positive integers, query heads per KV head (got {kv!r}); 1 is plain multi-head attention.")
    space = Space(kv_group=tuple(dict.fromkeys(kv)), **dims)
    odd = [h for h in space.head_dim.candidates() if h % 2]
    if odd or (isinstance(space.head_dim, Range) and space.head_dim.low != space.head_dim.high):
        if isinstance(space.head_dim, Range):
            raise MlxllmError(f"[space] head_dim in {where} must be a list of even sizes (rotary embeddings need even head dims), e.g. head_dim = [16, 32], not a range.")
        raise MlxllmError(f"[space] head_dim in {where} holds odd sizes {odd}: rotary embeddings need even head dims. Use e.g. head_dim = [16, 32].")
    heads = space.n_heads.candidates() if isinstance(space.n_heads, Choice) or space.n_heads.high - space.n_heads.low <= 64 else []
    lonely = [h for h in heads if not space.kv_groups(h)]
    if lonely:
        raise MlxllmError(
            f"[space] in {where}: no kv_group in {list(space.kv_group)} divides n_heads = {lonely}, so those head counts cannot be built. "
            "Add 1 to kv_group (plain multi-head attention) or drop those head counts."
        )
    if isinstance(space.n_heads, Range) and 1 not in space.kv_group:
        raise MlxllmError(f"[space] in {where}: with a wide n_heads range, kv_group must include 1 so that every head count can be built.")

    b = _table(d, "budget", ("kind", "amount", "eval_interval"), where)
    kind, amount = b.get("kind", "steps"), b.get("amount")
    if kind not in BUDGET_KINDS:
        raise MlxllmError(f"[budget] kind in {where} must be one of {', '.join(BUDGET_KINDS)} (got {kind!r}).")
    if amount is None:
        amount = {"steps": base.train.max_steps, "tokens": base.train.max_tokens, "seconds": base.train.max_seconds}[kind]
    if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
        raise MlxllmError(f"[budget] amount in {where} must be a positive number of {kind} (got {amount!r}).")
    eval_interval = b.get("eval_interval", base.train.eval_interval)
    if not isinstance(eval_interval, int) or eval_interval < 1:
        raise MlxllmError(f"[budget] eval_interval in {where} must be a positive number of steps (got {eval_interval!r}).")
    budget = Budget(kind, amount, eval_interval)
    base = replace(base, train=budget.apply(base.train))
    spec_name = d.get("name") or (path.stem if path else "search")

    t = _table(d, "search", ("objectives", "pruner", "sampler", "trials", "seed", "caps", "startup_trials"), where)
    objectives = t.get("objectives", ["val_loss"])
    objectives = [objectives] if isinstance(objectives, str) else list(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or "val_loss" not in objectives or len(set(objectives)) != len(objectives):
        raise MlxllmError(
            f"[search] objectives in {where} must include val_loss, once, plus any of {', '.join(o for o in OBJECTIVES if o != 'val_loss')} "
            f"(got {objectives})."
        )
    objectives = ["val_loss"] + [o for o in objectives if o != "val_loss"]
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
    trials = t.get("trials", 20)
    if not isinstance(trials, int) or trials < 1:
        raise MlxllmError(f"[search] trials in {where} must be a positive integer (got {trials!r}).")
    startup = t.get("startup_trials", 10)
    if not isinstance(startup, int) or startup < 0:
        raise MlxllmError(f"[search] startup_trials in {where} must be a non-negative integer (got {startup!r}).")
    settings = Settings(tuple(objectives), t.get("pruner", "hyperband"), t.get("sampler", "tpe"), trials, t.get("seed"),
                        Caps(**caps_d), startup)

    spec = SearchSpec(spec_name, base, space, budget, settings, str(path or ""))
    steps = budget.steps(spec.tokens_per_step)
    if steps is not None and steps < eval_interval:
        raise MlxllmError(
            f"The budget of {amount:g} {kind} ({steps} steps of {spec.tokens_per_step:,} tokens) is shorter than one evaluation "
            f"interval ({eval_interval} steps), so no trial would be evaluated before it ends and nothing could be pruned. "
            "Raise [budget] amount or lower [budget] eval_interval."
        )
    return spec


def load_spec(path: str | Path, *, data: str | None = None) -> SearchSpec:
    """Read a search spec TOML (see configs/search/)."""
    path = Path(path)
    if not path.is_file():
        raise MlxllmError(f"Search spec {path} does not exist. configs/search/ has examples (tiny.toml, shakespeare.toml).")
    try:
        d = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MlxllmError(f"Search spec {path} is not valid TOML: {e}. Fix the file and try again.") from None
    return parse_spec(d, path, data=data)


def run_config(spec: SearchSpec, model: ModelConfig, learning_rate: float, out_dir: str | Path) -> RunConfig:
    """The full run config of one trial, as `mlxllm train --config` reads it."""
    return replace(spec.base, model=model, train=replace(spec.base.train, learning_rate=learning_rate, out_dir=str(out_dir)))
