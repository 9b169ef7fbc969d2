"""`mlxllm search`: registered on the core CLI through the `mlxllm.plugins` entry point. Optuna is imported lazily."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from mlxllm.cli import friendly
from mlxllm.errors import MlxllmError

import typer

search_app = typer.Typer(
    help="Search model architectures with Optuna (resumable, parallel, budget-aware).", no_args_is_help=True
)


def _need_optuna() -> None:
    try:
        import matplotlib  # noqa: F401
        import optuna  # noqa: F401
    except ImportError:
        raise MlxllmError(
            "The search needs Optuna and matplotlib: install them with pip install 'mlxllm[search]'."
        ) from None


@search_app.command("run")
@friendly
def run_cmd(
    spec: Annotated[Path, typer.Argument(help="Search spec TOML (see configs/search/).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Search directory (default: searches/<spec name>).")
    ] = None,
    trials: Annotated[
        int | None, typer.Option(help="Total trials the study should hold; a resumed search adds the difference.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine, all sharing the study.")] = 1,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL or journal file (default: a journal in --out); "
            "postgresql://user@host/db shares the study between machines."
        ),
    ] = None,
    study_name: Annotated[str | None, typer.Option(help="Study name (default: the spec's name).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampler seed: a one-worker search is then reproducible.")] = None,
    seed_config: Annotated[
        list[Path] | None, typer.Option("--seed-config", help="A run config to try first (repeatable).")
    ] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Corpus, overriding the spec's train.data.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
    target_seconds: Annotated[
        float | None, typer.Option(help="Optimise for a run of this many seconds of training on this machine.")
    ] = None,
    target_steps: Annotated[int | None, typer.Option(help="Optimise for a run of this many optimizer steps.")] = None,
    target_tokens: Annotated[int | None, typer.Option(help="Optimise for a run of this many training tokens.")] = None,
    search_seconds: Annotated[float | None, typer.Option(help="The search's own wall-clock budget in seconds.")] = None,
    planner: Annotated[
        str | None,
        typer.Option(
            help="How the loss at the target is predicted: fit (a scaling law across trials' finished WSD runs), "
            "curves (each trial's learning curve), auto (fit below 6 targets of search on a time target)."
        ),
    ] = None,
) -> None:
    """Run (or resume) an architecture search; writes best.toml into the search directory."""
    _need_optuna()
    from mlxllm_search.run import search

    given = [
        (k, v)
        for k, v in (("seconds", target_seconds), ("steps", target_steps), ("tokens", target_tokens))
        if v is not None
    ]
    if len(given) > 1:
        raise MlxllmError("Give one target: --target-seconds, --target-steps or --target-tokens, not several.")
    search(
        spec,
        out=out,
        trials=trials,
        workers=workers,
        storage=storage,
        study_name=study_name,
        seed=seed,
        seed_configs=seed_config or (),
        data=data,
        show=not quiet,
        target=given[0] if given else None,
        search_seconds=search_seconds,
        planner=planner,
    )


@search_app.command("report")
@friendly
def report_cmd(
    search_dir: Annotated[Path, typer.Argument(help="A search directory (the --out of `mlxllm search run`).")],
    storage: Annotated[str | None, typer.Option(help="Storage URL, if the search used --storage.")] = None,
    study_name: Annotated[
        str | None, typer.Option(help="Study name, if not the one recorded in the directory.")
    ] = None,
) -> None:
    """Write plots (optimization history, Pareto front, parameter importances) as PNGs into the search directory."""
    _need_optuna()
    from mlxllm_search.report import report

    written = report(search_dir, storage=storage, study_name=study_name)
    for path in written:
        print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(search_app, name="search")
