"""Dropout and weight decay in a search's [space]: the spec reads and checks them, a trial samples them and
best.toml carries the winner's, the base stays trial 0, and the fit planner (whose law is over size and
tokens) holds them at the base's values and says, when the data is the limit, what would tune them.

Tiny models on a generated corpus: the one search trains a few trials of 20 steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from mlxllm import MlxllmError, load_config  # noqa: E402

import test_forecast  # noqa: E402
import test_search  # noqa: E402
from mlxllm_search import search  # noqa: E402
from mlxllm_search.best import best_trial  # noqa: E402
from mlxllm_search.forecast import DataVerdict, Forecast, make_forecast, render  # noqa: E402
from mlxllm_search.plan_search import (  # noqa: E402
    architecture,
    held_regularisers,
    plan_candidates,
    trial_params,
    write_plan,
)
from mlxllm_search.space import Choice, Range, Sample, run_config  # noqa: E402
from mlxllm_search.spec import parse_spec  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

search_cache = test_search.search_cache  # fixtures: the module's private token cache (autouse), its corpus
text = test_search.text
VOCAB = 257  # byte tokens

BASE: dict[str, Any] = {
    "name": "r",
    "base": {
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "mlp_ratio": 2.0, "max_seq_len": 32},
        "tokenizer": {"kind": "byte"},
        "train": {"batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 2, "eval_batches": 2},
    },
    "space": {"n_layers": [1, 2], "head_dim": [16], "n_heads": [1, 2, 4], "mlp_ratio": [2.0]},
    "budget": {"kind": "steps", "amount": 20, "eval_interval": 10},
}


def spec_of(
    space: dict[str, Any] | None = None, model: dict[str, Any] | None = None, train: dict[str, Any] | None = None
):
    """BASE with these [space], [base.model] and [base.train] keys added, parsed."""
    d = copy.deepcopy(BASE)
    d["space"].update(space or {})
    d["base"]["model"].update(model or {})
    d["base"]["train"].update(train or {})
    return parse_spec(d)


def target_spec(space: dict[str, Any], model: dict[str, Any] | None = None, train: dict[str, Any] | None = None):
    """A fit-planner spec (a target of 30 s, 16 s of search) over BASE's sizes with `space` added."""
    d = copy.deepcopy(BASE)
    del d["budget"]
    d["space"].update(space)
    d["base"]["model"].update(model or {})
    d["base"]["train"].update(train or {})
    d["target"] = {"seconds": 30, "planner": "fit"}
    d["search"] = {"seconds": 16}
    spec = parse_spec(d)
    assert spec.planner == "fit"
    return spec


# --- the spec --------------------------------------------------------------------------------------------


def test_the_spec_reads_dropout_and_weight_decay_choices_and_ranges() -> None:
    spec = spec_of({"dropout": [0, 0.1, 0.1], "weight_decay": {"min": 0.01, "max": 0.3, "log": True}})
    assert spec.space.dropout == Choice((0.0, 0.1)) and all(isinstance(v, float) for v in spec.space.dropout.values)
    assert spec.space.weight_decay == Range(0.01, 0.3, log=True)
    spec = spec_of({"dropout": {"min": 0, "max": 0.3}, "weight_decay": 0})  # a bare number: one choice
    assert spec.space.dropout == Range(0.0, 0.3) and spec.space.weight_decay == Choice((0.0,))
    plain = spec_of()
    assert plain.space.dropout is None and plain.space.weight_decay is None  # not searched: the base's
    assert spec.space_hash() != plain.space_hash()  # a study of one space is not resumed with the other


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("dropout", 1.0, r"dropout .* probability .* in \[0, 1\) \(got 1\.0\)"),
        ("dropout", [0.0, -0.1], r"in \[0, 1\) \(got \[0\.0, -0\.1\]\)"),
        ("dropout", {"min": 0.0, "max": 1.5}, r"in \[0, 1\) \(got \{'min': 0\.0, 'max': 1\.5\}\)"),
        ("dropout", [], r"dropout .* \(got \[\]\)\. Write e\.g\. dropout = \[0\.0, 0\.1\]"),
        ("dropout", True, r"list of choices or a table .* \(got True\)"),
        (
            "dropout",
            {"min": 0.0, "max": 0.3, "log": True},
            r"log scale cannot start at 0\. Start it at .* min = 0\.003",
        ),
        ("weight_decay", -0.1, r"weight_decay .* 0 or more \(got -0\.1\)"),
        ("weight_decay", ["a lot"], r"0 or more \(got \['a lot'\]\)"),
        ("weight_decay", {"min": 0.3, "max": 0.1}, r"min 0\.3 > max 0\.1: the range is empty"),
        ("weight_decay", {"min": 0.1}, r"list of choices or a table \{ min = \.\., max = \.\."),
        (
            "weight_decay",
            {"min": 0, "max": 0.3, "log": True},
            r"cannot start at 0.* weight_decay = \[0\.0, 0\.03, 0\.3\]",
        ),
    ],
)
def test_bad_values_are_refused_in_one_paragraph(key: str, value: Any, says: str) -> None:
    with pytest.raises(MlxllmError, match=says) as e:
        spec_of({key: value})
    assert "\n" not in str(e.value) and f"[space] {key}" in str(e.value)


# --- trials --------------------------------------------------------------------------------------------


def test_params_of_the_base_reproduce_its_dropout_and_weight_decay(tmp_path: Path) -> None:
    space = {"dropout": [0.0, 0.1], "weight_decay": {"min": 0.01, "max": 0.2, "log": True}}
    spec = spec_of(space, model={"dropout": 0.1}, train={"weight_decay": 0.05})
    params = spec.space.params_of(spec.base)
    assert params is not None and params["dropout"] == 0.1 and params["weight_decay"] == 0.05
    study = optuna.create_study()
    study.enqueue_trial(params)  # as the search makes the base trial 0
    sample = spec.space.suggest(study.ask(), spec.base)
    base = Sample.of(spec.base)
    assert (sample.model.dropout, sample.learning_rate, sample.weight_decay) == (0.1, 1e-2, 0.05)
    assert (sample.model.n_layers, sample.model.d_model, sample.model.n_heads) == (1, 32, 2)
    assert base.model.dropout == 0.1
    run = run_config(spec, sample, tmp_path / "out")
    assert run.model.dropout == 0.1 and run.train.weight_decay == 0.05 and run.train.out_dir == str(tmp_path / "out")
    assert spec.space.params_of(run) == params
    # A base whose dropout or weight decay the space leaves out is not trial 0.
    for model, train in (({"dropout": 0.2}, {"weight_decay": 0.05}), ({"dropout": 0.1}, {"weight_decay": 0.5})):
        other = spec_of(space, model=model, train=train)
        assert other.space.params_of(other.base) is None


def test_a_tiny_search_samples_dropout_and_its_best_config_carries_it(tmp_path: Path, text: Path) -> None:
    spec = test_search.write_spec(
        tmp_path,
        text,
        space="n_heads = [2]\nlearning_rate = [1e-2]\ndropout = { min = 0.0, max = 0.5 }\n"
        "weight_decay = [0.0, 0.1, 0.3]",
        search='pruner = "none"\nsampler = "random"\ntrials = 4',
    )
    result = search(spec, out=tmp_path / "s", trials=4, seed=0, show=False)
    trials = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    assert trials[0].params["dropout"] == 0.0 and trials[0].params["weight_decay"] == 0.1  # the base, trial 0
    assert len({t.params["dropout"] for t in trials}) == 4  # sampled over the range
    for t in trials:  # what each trial trained with is what it sampled
        assert t.user_attrs["model"]["dropout"] == t.params["dropout"]
        assert t.user_attrs["weight_decay"] == t.params["weight_decay"]
    best, config = best_trial(result.study), load_config(result.best_config)
    assert config.model.dropout == best.params["dropout"] and config.train.weight_decay == best.params["weight_decay"]


# --- the fit planner -------------------------------------------------------------------------------------


def test_the_fit_planner_holds_them_at_the_bases_values() -> None:
    spec = target_spec({"dropout": [0.0, 0.2], "weight_decay": [0.05, 0.1]})
    candidates = plan_candidates(spec, VOCAB)
    assert len(candidates) == 6  # the grid's 6: none is deep enough for the law's trend, so all are kept
    for m in candidates:
        p = trial_params(spec, m)
        assert (p["dropout"], p["weight_decay"], m.dropout) == (0.0, 0.1, 0.0)  # the base's: 0 and TrainConfig's 0.1
    assert architecture(spec, spec.base.model, VOCAB) is not None  # the base is trial 0
    assert held_regularisers(spec) == {"dropout": 0.0, "weight_decay": 0.1}
    assert held_regularisers(target_spec({})) is None  # nothing searched: nothing held


def test_the_fit_planner_holds_the_spaces_nearest_values_and_its_pick_has_them(tmp_path: Path) -> None:
    # The space leaves the base's out (dropout 0.05, weight decay 0.1): the nearest of its values, everywhere.
    spec = target_spec({"dropout": [0.1, 0.3], "weight_decay": {"min": 0.2, "max": 0.5}}, model={"dropout": 0.05})
    candidates = plan_candidates(spec, VOCAB)
    assert {m.dropout for m in candidates} == {0.1}
    assert {(trial_params(spec, m)["dropout"], trial_params(spec, m)["weight_decay"]) for m in candidates} == {
        (0.1, 0.2)
    }
    base = architecture(spec, spec.base.model, VOCAB)
    assert base is not None and base.dropout == 0.1
    held = held_regularisers(spec)
    assert held == {"dropout": 0.1, "weight_decay": 0.2}

    # A plan on a small corpus (synthetic finished runs of these candidates on a known law): the data is the
    # limit, and the verdict says the plan held them and what tunes them; best.toml's pick has the held values.
    law = test_forecast
    plan = make_forecast(
        law.study(5e3, trained=candidates), 5e3, candidates, law.measured_speed(candidates), law.LENGTH, 360, held=held
    )
    assert plan.verdict is not None and plan.verdict.fires
    shown = render(plan)
    assert "more text would help more" in shown and "held dropout at 0.1 and weight decay at 0.2" in shown
    assert '[target] planner = "curves"' in shown and "[budget]" in shown
    assert Forecast.from_dict(json.loads(json.dumps(plan.to_dict()))).verdict == plan.verdict  # plan.json keeps it
    path = tmp_path / "best.toml"
    write_plan(optuna.create_study(study_name="p"), spec, tmp_path, plan, path)
    best = load_config(path)
    assert best.model.dropout == 0.1 and best.train.weight_decay == 0.2 and best.train.schedule == "wsd"
    assert "held dropout at 0.1" in path.read_text()


def test_the_verdict_names_held_regularisers_only_when_the_data_is_the_limit() -> None:
    fires = DataVerdict(12.0, 0.2, 0.05, 2_000_000, 0.9, True, {"weight_decay": 0.1})
    assert "held weight decay at 0.1" in fires.describe() and "dropout" not in fires.describe()
    assert "held" not in DataVerdict(12.0, 0.2, 0.05, 2_000_000, 0.9, True).describe()  # nothing searched
    quiet = DataVerdict(2.0, 0.0, 0.05, 2_000_000, 0.1, False, {"weight_decay": 0.1})
    assert quiet.describe().startswith("not the limit") and "held" not in quiet.describe()
