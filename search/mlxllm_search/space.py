"""What a search holds: the [space] of architectures it samples, the equal [budget] of every trial or the
[target] run it optimises for (target.py), and its [search] settings (objectives, sampler, pruner, caps, its
own time budget). `spec` reads them from TOML.

The space is valid by construction: d_model is head_dim * n_heads, so heads always divide it, and
n_kv_heads is n_heads / kv_group with only the groups that divide n_heads on offer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxllm.config import ModelConfig, RunConfig, TrainConfig
from mlxllm.errors import MlxllmError

from mlxllm_search.target import Plan, Target, check_fit_budget, make_plan

if TYPE_CHECKING:
    import optuna

# name: (direction, what it measures)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "val_loss": ("minimize", "validation loss at the end of the budget (predicted at the target, with one)"),
    "params": ("minimize", "parameter count"),
    "step_ms": ("minimize", "measured training-step latency in ms"),
    "gen_tokens_per_sec": ("maximize", "measured generation speed in tokens/s"),
    "memory_gb": ("minimize", "measured peak memory in GB"),
}
PRUNERS = ("hyperband", "median", "successive-halving", "none")
SAMPLERS = ("tpe", "random")
BUDGET_KINDS = ("steps", "tokens", "seconds")
CAPS = ("params", "memory_gb", "step_ms")
SPACE_KEYS = ("n_layers", "head_dim", "n_heads", "kv_group", "mlp_ratio", "learning_rate", "dropout", "weight_decay")
# Bytes per parameter that training holds at least: weights, gradients and AdamW's two moments in float32.
TRAIN_BYTES_PER_PARAM = 16


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        return list(self.values)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def grid(self, keep: Any = None) -> list[Any]:
        return list(self.values)

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

    def grid(self, keep: Any = None) -> list[Any]:
        """A few values across the range for a design that enumerates the space: every integer of a narrow
        integer range, else its ends and middle (geometric for a log range), and `keep` when it is inside."""
        if self.integer and self.high - self.low <= 64:
            return list(range(int(self.low), int(self.high) + 1))
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        values = {self.low, self.high, round(mid) if self.integer else mid}
        if keep is not None and self.contains(keep):
            values.add(keep)
        return sorted(values)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, v: Any) -> bool:
        return self.low <= v <= self.high and (not self.integer or float(v).is_integer())


Dimension = Choice | Range


@dataclass(frozen=True)
class Sample:
    """What one trial changes in the base run config: the architecture (with its dropout), the learning rate
    and the weight decay."""

    model: ModelConfig
    learning_rate: float
    weight_decay: float

    @staticmethod
    def of(run: RunConfig) -> Sample:
        """The sample a run config holds (a base config's, unchanged)."""
        return Sample(run.model, run.train.learning_rate, run.train.weight_decay)


@dataclass(frozen=True)
class Space:
    n_layers: Dimension
    head_dim: Dimension
    n_heads: Dimension
    kv_group: tuple[int, ...] = (1,)  # query heads per KV head
    mlp_ratio: Dimension | None = None  # None: the base config's
    learning_rate: Dimension | None = None  # None: the base config's
    dropout: Dimension | None = None  # the model's residual dropout; None: the base config's
    weight_decay: Dimension | None = None  # AdamW's; None: the base config's

    @staticmethod
    def kv_name(n_heads: int) -> str:
        # A categorical's choices cannot change between trials, so each head count has its own parameter.
        return f"kv_group[n_heads={n_heads}]"

    def kv_groups(self, n_heads: int) -> list[int]:
        return [g for g in self.kv_group if n_heads % g == 0]

    def suggest(self, trial: optuna.Trial, base: RunConfig) -> Sample:
        """Sample one architecture (and learning rate, dropout, weight decay); every sample builds."""
        n_layers = self.n_layers.suggest(trial, "n_layers")
        head_dim = self.head_dim.suggest(trial, "head_dim")
        n_heads = self.n_heads.suggest(trial, "n_heads")
        groups = self.kv_groups(n_heads)
        group = trial.suggest_categorical(self.kv_name(n_heads), groups) if len(groups) > 1 else groups[0]
        mlp_ratio = self.mlp_ratio.suggest(trial, "mlp_ratio") if self.mlp_ratio else base.model.mlp_ratio
        lr = self.learning_rate.suggest(trial, "learning_rate") if self.learning_rate else base.train.learning_rate
        dropout = self.dropout.suggest(trial, "dropout") if self.dropout else base.model.dropout
        decay = self.weight_decay.suggest(trial, "weight_decay") if self.weight_decay else base.train.weight_decay
        model = replace(self.build(base.model, n_layers, head_dim, n_heads, group, mlp_ratio), dropout=dropout)
        return Sample(model, lr, decay)

    @staticmethod
    def build(
        base: ModelConfig, n_layers: int, head_dim: int, n_heads: int, group: int, mlp_ratio: float
    ) -> ModelConfig:
        return replace(
            base,
            n_layers=n_layers,
            d_model=head_dim * n_heads,
            n_heads=n_heads,
            n_kv_heads=n_heads // group,
            ffn_dim=None,
            mlp_ratio=mlp_ratio,
        )

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
        for name, dim, value in (
            ("mlp_ratio", self.mlp_ratio, m.mlp_ratio),
            ("learning_rate", self.learning_rate, run.train.learning_rate),
            ("dropout", self.dropout, m.dropout),
            ("weight_decay", self.weight_decay, run.train.weight_decay),
        ):
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

    def grid(self, base: ModelConfig) -> list[ModelConfig]:
        """The architectures of a design that enumerates the space: every choice, a few values of each range
        (Range.grid, the base's own value kept), every KV grouping."""
        ratios = self.mlp_ratio.grid(base.mlp_ratio) if self.mlp_ratio else [base.mlp_ratio]
        out = []
        for n_layers, head_dim, n_heads, ratio in itertools.product(
            self.n_layers.grid(base.n_layers),
            self.head_dim.grid(base.head_dim),
            self.n_heads.grid(base.n_heads),
            ratios,
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
    seconds: float | None = None  # the search's own wall-clock budget; None: only `trials` ends it

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
    target: Target | None = None  # the run the search optimises for; None: every trial trains the [budget]

    @property
    def tokens_per_step(self) -> int:
        t = self.base.train
        return t.batch_size * (t.seq_len or self.base.model.max_seq_len) * t.grad_accum

    def space_hash(self) -> str:
        """What makes trials comparable: the space, the fixed config, budget and objectives."""
        space = asdict(self.space)
        for key in ("dropout", "weight_decay"):  # not searched: a study begun before they could be resumes
            if space[key] is None:
                del space[key]
        d = {
            "space": space,
            "base": self.base.to_dict(),
            "budget": asdict(self.budget),
            "objectives": list(self.settings.objectives),
        }
        d["base"]["train"].pop("out_dir")
        if self.target is not None:  # its rungs and the search's budget may change on resume: predictions still compare
            d["budget"] = {"target": self.target.key()}
            if self.planner == "fit":  # its trials' values are finished WSD losses, not predictions at the target
                d["budget"]["planner"] = "fit"
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def planner(self) -> str | None:
        """How a target-aware search predicts the loss at the target: "fit" or "curves" (None without a target)."""
        return None if self.target is None else self.target.planner_for(self.settings.seconds)

    @property
    def plan(self) -> Plan | None:
        """The rungs of a target-aware search that uses the curves (None without a target, or with the fit,
        whose budget is checked here instead)."""
        if self.target is None:
            return None
        if self.planner == "fit":
            check_fit_budget(self.settings.seconds)
            return None
        return make_plan(self.target, self.settings.seconds, self.tokens_per_step)

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


def run_config(spec: SearchSpec, sample: Sample, out_dir: str | Path) -> RunConfig:
    """The full run config of one trial (the base with `sample`), as `mlxllm train --config` reads it."""
    train = replace(
        spec.base.train, learning_rate=sample.learning_rate, weight_decay=sample.weight_decay, out_dir=str(out_dir)
    )
    return replace(spec.base, model=sample.model, train=train)
