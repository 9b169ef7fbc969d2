"""best.toml: a search's winner as a run config, ready for `mlxllm train --config`, its header saying what it won."""

from __future__ import annotations

from pathlib import Path

from mlxllm.config import ModelConfig, dump_toml, from_dict

import optuna
from optuna.trial import FrozenTrial

from mlxllm_search.records import record_of
from mlxllm_search.space import Sample, SearchSpec, run_config
from mlxllm_search.target_search import target_best, target_header

BEST_NAME = "best.toml"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The feasible completed trial with the lowest validation loss (on the Pareto front when multi-objective)."""
    front = study.best_trials
    return min(front, key=lambda t: t.values[0]) if front else None


def write_best(study: optuna.Study, spec: SearchSpec, search_dir: Path) -> Path | None:
    t = best_trial(study) if spec.target is None else target_best(study)
    if t is None:
        return None
    record = record_of(t)
    decay = spec.base.train.weight_decay if record.weight_decay is None else record.weight_decay  # older studies
    sample = Sample(from_dict(ModelConfig, record.model), record.learning_rate, decay)
    run = run_config(spec, sample, search_dir / "best")
    path = search_dir / BEST_NAME
    if spec.target is not None:  # the target's budget and schedule are the spec's base: run_config keeps them
        path.write_text(target_header(study, spec, t, path) + dump_toml(run))
        return path
    path.write_text(
        f"# Best configuration of search {study.study_name!r}: trial {t.number}, validation loss {t.values[0]:.4f} "
        f"after the search budget ({spec.budget.amount:g} {spec.budget.kind}).\n"
        f"# Train it: mlxllm train --config {path}   (raise train.max_steps for a longer run)\n\n" + dump_toml(run)
    )
    return path
