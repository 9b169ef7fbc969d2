"""Plots of a finished (or running) search, drawn by Optuna's matplotlib visualizations into the search directory."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

from mlxllm.errors import MlxllmError

import optuna

from mlxllm_search.records import StudyRecord
from mlxllm_search.run import META_NAME
from mlxllm_search.storage import open_storage


def report(search_dir: str | Path, *, storage: str | None = None, study_name: str | None = None) -> list[Path]:
    """Write optimization history, intermediate values, Pareto front (multi-objective) and parameter importances
    as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    search_dir = Path(search_dir)
    meta_path = search_dir / META_NAME
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if not meta and storage is None:
        raise MlxllmError(
            f"{search_dir} is not a search directory (it has no {META_NAME}). Pass the --out of `mlxllm search run`, "
            "or --storage and --study-name."
        )
    store = open_storage(storage or meta.get("storage"), search_dir)
    name = study_name or meta.get("study_name")
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except (KeyError, ValueError):
        names = optuna.get_all_study_names(store)
        raise MlxllmError(
            f"No study named {name!r} in that storage (it holds {', '.join(names) or 'none'}). Pass --study-name."
        ) from None
    objectives = StudyRecord.from_attrs(study.user_attrs).objectives or meta.get("objectives") or ["val_loss"]
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise MlxllmError(
            f"The study {name!r} has no completed trial yet, so there is nothing to plot. Run the search first."
        )
    multi = len(objectives) > 1
    loss = {"target": (lambda t: t.values[0]) if multi else None, "target_name": "val_loss"}

    plots: dict[str, Callable[[], object]] = {
        "history": lambda: vis.plot_optimization_history(study, **loss),
        "importances": lambda: vis.plot_param_importances(study, **loss),
    }
    if multi and len(objectives) <= 3:
        plots["pareto_front"] = lambda: vis.plot_pareto_front(study, target_names=objectives)
    if not multi:
        plots["intermediate_values"] = lambda: vis.plot_intermediate_values(study)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for key, plot in plots.items():
            try:
                ax = plot()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances need two completed trials that differ
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            path = search_dir / f"{key}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written
