"""`mlxllm search`: tiny searches end to end, pruning, resume, caps, dead and parallel workers, bad input.

Two model shapes only (1 layer, head_dim 16, one or two heads): each new shape costs an MLX compile.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import mlxllm.cli  # noqa: E402
from mlxllm import MlxllmError, load_config  # noqa: E402

from mlxllm_search import search  # noqa: E402
from mlxllm_search.records import LOST  # noqa: E402
from mlxllm_search.spec import load_spec  # noqa: E402
from mlxllm_search.storage import counts  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

WORDS = ["the cat", "a dog", "my friend", "sees", "likes", "follows", "the red ball", "an old book", "the river"]


@pytest.fixture(scope="module", autouse=True)
def search_cache(tmp_path_factory: pytest.TempPathFactory):
    """A private token cache for this module (spawned workers and subprocesses inherit it)."""
    old = os.environ.get("MLXLLM_CACHE_DIR")
    os.environ["MLXLLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("search_cache"))
    yield
    if old is None:
        os.environ.pop("MLXLLM_CACHE_DIR", None)
    else:
        os.environ["MLXLLM_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("search_corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(1500)))
    return path


def base_tables(name: str, data: Path, train: str = "") -> str:
    """A tiny spec's name and [base] tables (a 1 x 32 byte model); `train` adds [base.train] lines."""
    return textwrap.dedent(f"""
        name = "{name}"
        [base.model]
        n_layers = 1
        d_model = 32
        n_heads = 2
        mlp_ratio = 2.0
        max_seq_len = 32
        [base.tokenizer]
        kind = "byte"
        [base.train]
        data = "{data}"
        batch_size = 4
        learning_rate = 1e-2
        warmup_steps = 2
        eval_batches = 2
        keep_last = 1
        sample_tokens = 0
    """) + textwrap.dedent(train)


def write_spec(
    tmp_path: Path, data: Path, *, name: str = "t", space: str = "", budget: str = "", search: str = "", caps: str = ""
) -> Path:
    """A tiny spec; `space`, `budget`, `search` and `caps` lines replace the defaults key by key."""

    def merged(defaults: dict[str, str], extra: str) -> str:
        for line in filter(None, (x.strip() for x in extra.splitlines())):
            key, _, value = line.partition("=")
            defaults[key.strip()] = value.strip()
        return "\n".join(f"{k} = {v}" for k, v in defaults.items() if v)

    spec = base_tables(name, data)
    spec += "[space]\n" + merged(
        {
            "n_layers": "[1]",
            "head_dim": "[16]",
            "n_heads": "[1, 2]",
            "kv_group": "[1]",
            "mlp_ratio": "[2.0]",
            "learning_rate": "{ min = 1e-5, max = 1e-2, log = true }",
        },
        space,
    )
    spec += "\n[budget]\n" + merged({"kind": '"steps"', "amount": "20", "eval_interval": "10"}, budget)
    spec += "\n[search]\n" + merged(
        {"objectives": '["val_loss"]', "pruner": '"hyperband"', "sampler": '"tpe"', "trials": "3"}, search
    )
    if caps:
        spec += "\n[search.caps]\n" + merged({}, caps)
    path = tmp_path / f"{name}.toml"
    path.write_text(spec + "\n")
    return path


def states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials()]


def cli(*args: str):
    mlxllm.cli._load_plugins()
    return CliRunner().invoke(mlxllm.cli.app, list(args))


def test_api_search_resumes_and_its_best_config_trains(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text)
    out = tmp_path / "s"
    first = search(spec, out=out, trials=3, seed=0, show=False)
    assert counts(first.study) == (3, 0)
    t0 = first.study.trials[0]
    assert (t0.params["n_heads"], t0.params["learning_rate"]) == (2, 1e-2)  # the base config is trial 0
    assert first.best_config == out / "best.toml" and first.best_config.is_file()
    before = [t.params for t in first.study.trials]

    again = search(spec, out=out, trials=5, seed=0, show=False)  # same study, two more trials
    assert again.study.study_name == first.study.study_name and counts(again.study) == (5, 0)
    assert [t.params for t in again.study.trials[:3]] == before
    assert len({tuple(sorted(t.params.items())) for t in again.study.trials}) == 5  # a resumed seed does not replay

    best = load_config(again.best_config)
    assert best.model.d_model in (16, 32) and best.train.max_steps == 20
    result = cli("train", "--config", str(again.best_config), "--steps", "10", "--quiet", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "checkpoints").is_dir()


def test_cli_run_and_report_multi_objective(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, search='objectives = ["val_loss", "params"]')
    out = tmp_path / "s"
    result = cli("search", "run", str(spec), "--out", str(out), "--trials", "3", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert "Leaderboard" in result.output and "Pareto front" in result.output
    study = optuna.load_study(
        study_name="t",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))),
    )
    front = study.best_trials
    assert front and all(len(t.values) == 2 for t in front)
    for a in front:  # nothing on the front is dominated
        assert not any(
            all(x <= y for x, y in zip(b.values, a.values)) and b.values != a.values
            for b in study.trials
            if b.state == TrialState.COMPLETE
        )
    result = cli("search", "report", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "history.png").stat().st_size > 0 and (out / "pareto_front.png").is_file()


def test_pruner_prunes_a_hopeless_trial(tmp_path: Path, text: Path) -> None:
    # The base (lr 1e-2) runs first; a seed config with lr 1e-5 has learned nothing at the first rung.
    spec = write_spec(tmp_path, text, search='pruner = "successive-halving"')
    slow = tmp_path / "slow.toml"
    slow.write_text(
        "[model]\nn_layers = 1\nd_model = 32\nn_heads = 2\nmlp_ratio = 2.0\n[train]\nlearning_rate = 1e-5\n"
    )
    study = search(spec, out=tmp_path / "s", trials=2, seed_configs=[slow], show=False).study
    assert states(study) == [TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[1].params["learning_rate"] == 1e-5 and max(study.trials[1].intermediate_values) == 10


def test_caps_are_never_violated(tmp_path: Path, text: Path) -> None:
    # One head (d_model 16) has 6,720 parameters, two heads (d_model 32) 18,560: only one head fits.
    spec = write_spec(tmp_path, text, caps="params = 10_000")
    result = search(spec, out=tmp_path / "s", trials=4, seed=0, show=False)
    trials = result.study.trials
    assert trials[0].state == TrialState.PRUNED and "cap" in trials[0].user_attrs["rejected"]  # the base is over it
    assert trials[0].constraints["params"] > 0 and not trials[0].intermediate_values  # rejected before training
    for t in trials:
        assert t.state != TrialState.COMPLETE or t.user_attrs["params"] <= 10_000
    assert all(t.user_attrs["params"] <= 10_000 for t in result.best_trials)
    assert load_config(result.best_config).model.d_model == 16


def test_seeded_search_is_reproducible(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, search='sampler = "random"\npruner = "none"')
    runs = [search(spec, out=tmp_path / f"s{i}", trials=3, seed=7, show=False).study for i in range(2)]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]


def test_killed_worker_leaves_no_running_trial_and_its_config_is_retried(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, budget="amount = 400\neval_interval = 100")
    out = tmp_path / "s"
    code = f"from mlxllm_search import search; search({str(spec)!r}, out={str(out)!r}, trials=2, show=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy())
    storage = out / "study.journal"
    deadline = time.time() + 120
    running = None
    while running is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if storage.exists():
            study = optuna.load_study(
                study_name="t",
                storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(storage))),
            )
            # Wait until the trial has drawn its parameters, so the retry has something to compare with.
            running = next(
                (t for t in study.get_trials(states=(TrialState.RUNNING,)) if "worker" in t.user_attrs and t.params),
                None,
            )
    assert running is not None, "the search never started a trial"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    result = search(spec, out=out, trials=2, show=False)
    trials = result.study.trials
    assert TrialState.RUNNING not in states(result.study)
    assert result.requeued == [running.number]
    assert trials[running.number].state == TrialState.FAIL and trials[running.number].user_attrs[LOST]
    retried = [t for t in trials if running.number in t.system_attrs.get("retry_history", [])]
    assert len(retried) == 1 and retried[0].params == running.params and retried[0].state == TrialState.COMPLETE
    assert counts(result.study) == (2, 0)


def test_two_workers_share_one_journal_and_lose_no_trial(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, search='pruner = "none"')
    result = search(spec, out=tmp_path / "s", trials=4, workers=2, show=False)
    assert states(result.study).count(TrialState.COMPLETE) == 4 and len(result.study.trials) == 4
    owners = {t.user_attrs["worker"]["pid"] for t in result.study.trials}
    assert os.getpid() not in owners


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"space": "head_dim = []"}, "empty list"),
        ({"space": "n_layers = { min = 3, max = 1 }"}, "min 3 > max 1"),
        ({"space": "n_heads = [3]\nkv_group = [2]"}, "no kv_group"),
        ({"space": "head_dim = [15]"}, "odd"),
        ({"budget": "amount = 5"}, "shorter than one evaluation interval"),
        ({"search": 'objectives = ["params"]'}, "must include val_loss"),
        ({"caps": "params = 100"}, "No architecture in the search space fits the parameter cap"),
        ({"caps": "memory_gb = 1e-6"}, "memory cap"),
    ],
)
def test_bad_spec_is_one_clear_error(tmp_path: Path, text: Path, kwargs: dict[str, str], message: str) -> None:
    spec = write_spec(tmp_path, text, **kwargs)
    with pytest.raises(MlxllmError, match=message):
        search(spec, out=tmp_path / "s", show=False)
    assert not (tmp_path / "s" / "study.journal").exists()  # refused before any study or training


def test_missing_head_counts_are_refused(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text)
    spec.write_text(spec.read_text().replace("n_heads = [1, 2]\n", ""))
    with pytest.raises(MlxllmError, match="has no n_heads"):
        load_spec(spec)


def test_unopenable_storage_and_changed_space_are_refused(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text)
    with pytest.raises(MlxllmError, match="Cannot open the study storage"):
        search(spec, out=tmp_path / "s", storage="sqlite:////no/such/dir/x.db", show=False)
    with pytest.raises(MlxllmError, match="Cannot open the study storage"):
        search(spec, out=tmp_path / "s", storage="nosuchdb://x", show=False)
    search(spec, out=tmp_path / "s", trials=1, show=False)
    changed = write_spec(tmp_path, text, space="n_heads = [2]")
    with pytest.raises(MlxllmError, match="different search space"):
        search(changed, out=tmp_path / "s", trials=2, show=False)
    result = cli("search", "run", str(changed), "--out", str(tmp_path / "s"), "--trials", "2")
    # A user error leaves through typer.Exit (a SystemExit); any other exception would be a traceback.
    assert result.exit_code == 1 and "different search space" in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    bad = write_spec(tmp_path, text, name="u", budget="amount = 5")
    result = cli("search", "run", str(bad), "--out", str(tmp_path / "u"))
    assert result.exit_code == 1 and "Raise [budget] amount" in result.output
    assert isinstance(result.exception, SystemExit), result.exception


def test_sqlite_storage_url(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, search='pruner = "none"')
    url = f"sqlite:///{tmp_path / 'search.db'}"
    result = search(spec, out=tmp_path / "s", storage=url, trials=2, show=False)
    assert counts(optuna.load_study(study_name="t", storage=url)) == (2, 0) and result.best_config.is_file()


def test_without_optuna_the_command_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = cli("search", "run", str(tmp_path / "x.toml"))
    assert result.exit_code == 1 and "mlxllm[search]" in result.output


def test_measured_latency_cap_stops_trials_and_leaves_no_best(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, caps="step_ms = 0.001", search='pruner = "none"')
    result = search(spec, out=tmp_path / "s", trials=2, show=False)
    for t in result.study.trials:
        assert t.state == TrialState.PRUNED and "step_ms" in t.user_attrs["rejected"] and t.constraints["step_ms"] > 0
    assert result.best_config is None and result.best_trials == []


def test_measured_objectives(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, search='objectives = ["val_loss", "gen_tokens_per_sec", "memory_gb"]')
    result = search(spec, out=tmp_path / "s", trials=2, show=False)
    assert result.study.directions[1] == optuna.study.StudyDirection.MAXIMIZE
    for t in result.study.trials:
        loss, speed, memory = t.values
        assert loss > 0 and speed > 0 and 0 < memory < 1


@pytest.mark.parametrize("name", ["tiny", "shakespeare"])
def test_shipped_specs_load(name: str) -> None:
    spec = load_spec(Path(__file__).parents[1] / "configs" / "search" / f"{name}.toml")
    assert spec.space.architectures(spec.base.model) and spec.space_hash()
