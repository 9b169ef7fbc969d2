"""The fit planner of a target-aware search (planner = "fit", or "auto" below 6 targets of search): its choice,
the design of its trials (sizes spread over log N, ladders of cooldown branches past the warm-up), a tiny
search end to end (plan.json, best.toml with the WSD schedule), and the paragraph instead of a number when
the search's budget cannot buy a fit.

Tiny models (1-2 layers, d_model 16-64) on a generated corpus: each search takes seconds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

from mlxllm import MlxllmError, load_config  # noqa: E402
from mlxllm.schedule import length_for_stable, stable_steps  # noqa: E402

import test_search  # noqa: E402
import test_search_target  # noqa: E402
from mlxllm_search.design import (  # noqa: E402
    GOOD_LEVELS,
    LADDER,
    MIN_LEVELS,
    Cost,
    Ladder,
    Speeds,
    choose,
    first_unit,
    floor_unit,
    longest_ladder,
)
from mlxllm_search.forecast import Forecast, predict_loss  # noqa: E402
from mlxllm_search.law_points import DISTINCT, MIN_LAW_LAYERS, MIN_TRIALS, Point, first_step  # noqa: E402
from mlxllm_search.plan_gates import too_loose  # noqa: E402
from mlxllm_search.plan_search import PLAN_NAME, architecture, plan_candidates, write_plan  # noqa: E402
from mlxllm_search.scaling import law_params  # noqa: E402
from mlxllm_search.spec import load_spec, make_target  # noqa: E402
from mlxllm_search.storage import open_storage  # noqa: E402
from mlxllm_search.target import FULL_RUNS_PER_BUDGET  # noqa: E402
from mlxllm_search.throughput import model_key  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

search_cache = test_search.search_cache  # fixtures: the module's private token cache (autouse), its corpus
text = test_search.text

SPACE = """
[space]
n_layers = [1, 2]
head_dim = [16]
n_heads = [1, 2, 4]
kv_group = [1]
mlp_ratio = [2.0]
learning_rate = { min = 3e-3, max = 2e-2, log = true }
"""
VOCAB = 257  # byte tokens


cli = test_search_target.cli


def write_spec(tmp_path: Path, data: Path, tables: str, name: str = "p", warmup: int = 2) -> Path:
    path = test_search_target.write_spec(tmp_path, data, tables=tables, space=SPACE, name=name)
    path.write_text(path.read_text().replace("warmup_steps = 2", f"warmup_steps = {warmup}"))
    return path


def load_study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(None, out))


# --- which planner -----------------------------------------------------------------------------------------


def test_auto_plans_by_the_fit_below_six_targets_of_search(tmp_path: Path, text: Path) -> None:
    t = make_target("seconds", 300)
    assert t.planner == "auto" and FULL_RUNS_PER_BUDGET == 6
    assert t.planner_for(6 * 300 - 1) == "fit" and t.planner_for(30) == "fit"
    assert t.planner_for(6 * 300) == "curves" and t.planner_for(10_000) == "curves"
    assert t.planner_for(None) == "curves"  # no search budget: the rungs reach the target
    assert make_target("steps", 1000).planner_for(10) == "curves"  # a step target's seconds are unknown beforehand
    assert make_target("seconds", 300, min_fraction=0.1).planner_for(30) == "curves"  # rung settings: the curves
    assert make_target("seconds", 300, planner="curves").planner_for(30) == "curves"
    assert make_target("seconds", 300, planner="fit").planner_for(10_000) == "fit"

    def spec(tables: str, name: str):
        return load_spec(write_spec(tmp_path, text, tables, name=name))

    below, at = spec("[target]\nseconds = 2\n[search]\nseconds = 11\n", "b"), spec("[target]\nseconds = 2\n", "a")
    assert below.planner == "fit" and below.plan is None  # no rungs: the fit's trials are designed instead
    assert at.planner == "curves" and at.plan is not None
    assert spec("[target]\nseconds = 2\nplanner = 'fit'\n", "f").planner == "fit"
    assert below.space_hash() != at.space_hash()  # their trials' values differ in kind: one study holds one planner
    with pytest.raises(MlxllmError, match=r"\[target\] planner in .* must be one of auto, fit, curves \(got 'magic'\)"):
        spec("[target]\nseconds = 2\nplanner = 'magic'\n", "m")

    plain = str(write_spec(tmp_path, text, "", name="c"))
    result = cli("search", "run", plain, "--target-seconds", "2", "--planner", "magic", "--out", str(tmp_path / "c"))
    assert result.exit_code == 1 and "--planner must be one of auto, fit, curves" in result.output
    result = cli("search", "run", plain, "--planner", "fit", "--out", str(tmp_path / "c"))
    assert result.exit_code == 1 and "give a target too" in result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert not (tmp_path / "c" / "study.journal").exists()  # refused before any study or training


# --- the design ------------------------------------------------------------------------------------------


def test_every_designed_branch_finishes_past_the_warm_up() -> None:
    for warmup in (0, 1, 2, 5, 17, 50, 333):
        for fraction in (0.1, 0.2, 0.5):
            u = first_unit(warmup, fraction)
            assert length_for_stable(u, fraction) >= first_step(warmup) and u >= warmup and u % 2 == 0
            assert u <= max(2, warmup + 1) or length_for_stable(u - 2, fraction) < first_step(warmup)  # the first such
    cost = Cost(step_s=0.01, eval_s=0.02, call_s=0.5)
    ladder = longest_ladder(cost, 60.0, unit=80, fraction=0.2)
    assert ladder is not None and ladder.levels == len(LADDER) and ladder.unit > 80  # stretched to fill the share
    assert cost.seconds(ladder) <= 60 < cost.seconds(Ladder(ladder.unit + 2, ladder.levels, 0.2))
    # Fewer levels than LADDER: the unit is stretched too, so that the trial fills its share.
    short = longest_ladder(cost, cost.seconds(Ladder(80, 3, 0.2)) + 0.01, unit=80, fraction=0.2)
    assert short == Ladder(80, 3, 0.2) and short.steps == (80, 120, 160) and short.lengths == (100, 150, 200)
    assert short.interval == 40  # a checkpoint at every branch step
    wide = longest_ladder(cost, cost.seconds(Ladder(80, 3, 0.2)) * 1.2, unit=80, fraction=0.2)
    assert wide is not None and wide.levels == 3 and wide.unit > 80 and cost.seconds(wide) <= cost.seconds(short) * 1.2
    assert longest_ladder(cost, cost.seconds(Ladder(80, MIN_LEVELS, 0.2)) - 0.01, unit=80, fraction=0.2) is None
    with pytest.raises(ValueError, match="even step"):
        Ladder(81, 3, 0.2)


def test_the_design_spreads_sizes_over_log_n_base_first_within_the_budget(tmp_path: Path, text: Path) -> None:
    spec = load_spec(write_spec(tmp_path, text, "[target]\nseconds = 60\n[search]\nseconds = 20\n", warmup=10))
    candidates = [replace(m, vocab_size=VOCAB) for m in spec.space.grid(spec.base.model)]  # every shape
    base = architecture(spec, spec.base.model, VOCAB)
    assert base is not None and model_key(base) in {model_key(m) for m in candidates}
    speeds = Speeds(seq_len=32, tokens_per_step=128, eval_batches=2, peak_flops=2e10)
    unit, warmup = first_unit(10, 0.2), 10
    for seconds in (25.0, 40.0, 200.0):
        choices = choose(candidates, [base], [], speeds, seconds, unit, 0.2, warmup)
        assert len(choices) >= MIN_TRIALS and model_key(choices[0].model) == model_key(base)
        sizes = sorted(law_params(c.model) for c in choices)
        assert all(b > a * DISTINCT for a, b in zip(sizes, sizes[1:]))  # distinct sizes
        assert sum(c.cost_s for c in choices) <= seconds * 1.001
        for c in choices:  # no branch ends inside or just after the warm-up
            assert c.ladder.steps[0] >= unit and min(c.ladder.lengths) >= first_step(warmup)
            assert c.ladder.levels >= MIN_LEVELS and c.cost_s <= c.share_s
    # A base too slow for GOOD_LEVELS branch points in its share is still trial 0, at the fewest it affords,
    # while the other sizes get theirs: a trial of the user's default beats one more size.
    big = max(candidates, key=lambda m: m.flops_per_token(32))
    slow = replace(speeds, peak_flops=2e8)  # the step, not the set-up of each call, is most of a trial's cost
    cost = slow.cost(big)
    two, four = (cost.seconds(Ladder(unit, n, 0.2)) for n in (MIN_LEVELS, GOOD_LEVELS))
    choices = choose(candidates, [big], [], slow, MIN_TRIALS * (two + four) / 2, unit, 0.2, warmup)
    assert model_key(choices[0].model) == model_key(big) and MIN_LEVELS <= choices[0].ladder.levels < GOOD_LEVELS
    assert any(c.ladder.levels >= GOOD_LEVELS for c in choices[1:])
    # Measured trials: no architecture twice, the sizes chosen next away from those measured.
    first = choose(candidates, [base], [], speeds, 40.0, unit, 0.2, warmup)
    done = [c.model for c in first[:2]]
    rest = choose(candidates, [base], done, speeds, 40.0, unit, 0.2, warmup)
    assert rest and not {model_key(c.model) for c in rest} & {model_key(m) for m in done}
    # Once the designed trials ran, one more size where the time left affords it, none where it does not; a
    # trial whose runs all ended above the pairs level is replaced, so that MIN_TRIALS trials can pin the law.
    ran = [c.model for c in first]
    assert len(ran) == MIN_TRIALS and len(choose(candidates, [base], ran, speeds, 40.0, unit, 0.2, warmup)) == 1
    assert choose(candidates, [base], ran, speeds, 0.5, unit, 0.2, warmup) == []
    extra = choose(candidates, [base], ran, speeds, 40.0, unit, 0.2, warmup, unusable=1)
    assert len(extra) == 1 and model_key(extra[0].model) not in {model_key(m) for m in ran}
    assert len(choose(candidates, [base], ran, speeds, 40.0, unit, 0.2, warmup, unusable=2)) == 2
    # Too little time for a usable ladder on any size: the cheapest sizes measure how far short it falls, with
    # branches from past the warm-up (a branch needs its peak learning rate) that the fit will refuse.
    cheapest = min(candidates, key=lambda m: speeds.cost(m).step_s)
    usable, short = (speeds.cost(cheapest).seconds(Ladder(u, MIN_LEVELS, 0.2)) for u in (unit, warmup))
    assert short < usable
    tight = choose(candidates, [base], [], speeds, MIN_TRIALS * (usable + short) / 2, unit, 0.2, warmup)
    assert tight and all(min(c.ladder.lengths) < first_step(warmup) <= c.ladder.unit * 1.25 * 2 for c in tight)
    assert all(warmup <= c.ladder.unit < unit for c in tight)
    assert choose(candidates, [base], [], speeds, MIN_TRIALS * short * 0.99, unit, 0.2, warmup) == []


def test_later_trials_branch_from_where_the_runs_crossed_the_pairs_level(tmp_path: Path, text: Path) -> None:
    unit, warmup, floor = first_unit(10, 0.2), 10, 2.5

    def run(trial: int, losses: dict[int, float]) -> list[Point]:
        return [Point(trial, 10**5, k * 128.0, loss, k, warmup) for k, loss in losses.items()]

    early = run(0, {30: 2.4, 60: 2.1})  # below the level from its first branch on
    late = run(1, {30: 2.9, 60: 2.6, 90: 2.45, 120: 2.3})  # above it until its third
    assert floor_unit(unit, 0.2, [], floor) == floor_unit(unit, 0.2, [late], None) == unit
    assert floor_unit(unit, 0.2, [early], floor) == unit
    raised = floor_unit(unit, 0.2, [early, late], floor)  # the latest crossing of the trials
    assert raised == stable_steps(90, 0.2) > unit and length_for_stable(raised, 0.2) == 90
    assert floor_unit(unit, 0.2, [run(2, {30: 2.9, 60: 2.6})], floor) == 2 * stable_steps(60, 0.2)  # none crossed
    # The next trials' ladders start there: none of their branches is spent on a run the fit would refuse.
    spec = load_spec(write_spec(tmp_path, text, "[target]\nseconds = 60\n[search]\nseconds = 20\n", warmup=warmup))
    candidates = [replace(m, vocab_size=VOCAB) for m in spec.space.grid(spec.base.model)]
    speeds = Speeds(seq_len=32, tokens_per_step=128, eval_batches=2, peak_flops=2e10)
    later = choose(candidates, [], candidates[:1], speeds, 200.0, raised, 0.2, warmup)
    assert later and all(min(c.ladder.lengths) >= 90 for c in later)


def test_the_plan_leaves_out_shallow_models_but_the_base(tmp_path: Path, text: Path) -> None:
    deep = SPACE.replace("[1, 2]", "[1, 2, 3]")
    path = test_search_target.write_spec(tmp_path, text, tables="[target]\nseconds = 60\n", space=deep, name="deep")
    spec = load_spec(path)
    base = architecture(spec, spec.base.model, VOCAB)
    candidates = {model_key(m): m for m in plan_candidates(spec, VOCAB)}
    assert base is not None and base.n_layers == 1 and model_key(base) in candidates  # the user's own stays
    others = [m for k, m in candidates.items() if k != model_key(base)]
    # Shallower than MIN_LAW_LAYERS: off the law's trend in N, neither tried nor picked.
    assert others and all(m.n_layers >= MIN_LAW_LAYERS == 3 for m in others)
    # A space of shallow models only (one and two layers): the plan has nothing else, so it keeps them all.
    spec = load_spec(write_spec(tmp_path, text, "[target]\nseconds = 60\n"))
    shapes = {(m.n_layers, m.d_model, m.n_heads) for m in spec.space.grid(spec.base.model)}
    assert {(m.n_layers, m.d_model, m.n_heads) for m in plan_candidates(spec, VOCAB)} == shapes


# --- searches --------------------------------------------------------------------------------------------


def test_tiny_plan_search_end_to_end(tmp_path: Path, text: Path) -> None:
    # max_2sd, switch_sd: act on the pick of a fit this small, however loose (the fallbacks are checked after).
    spec = write_spec(tmp_path, text, "[target]\nseconds = 30\nmax_2sd = 100\nswitch_sd = 0\n")
    out, budget = tmp_path / "s", 24.0
    start = time.perf_counter()
    result = cli("search", "run", str(spec), "--out", str(out), "--search-seconds", str(budget))
    wall = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    # The budget is the search's own wall clock: MLX's first compile on a new machine (the warm-up) is not in it.
    warm = test_search_target.warm_seconds(result.output)
    assert wall < budget + 5 + warm, f"the search ran {wall:.1f} s on a {budget:g} s budget"
    assert "Planner: fit" in result.output and "plan for 30 s" in result.output, result.output

    plan = json.loads((out / PLAN_NAME).read_text())
    forecast = Forecast.from_dict(plan)
    assert forecast.law is not None and forecast.shortfall is None
    assert [p.multiple for p in forecast.picks] == [0.25, 0.5, 1.0, 2.0, 4.0]
    best = load_config(out / "best.toml")
    pick = forecast.pick(1.0)
    assert best.train.schedule == "wsd" and best.train.max_seconds == 30  # the schedule the prediction is of
    assert (best.model.n_layers, best.model.d_model) == (pick.model.n_layers, pick.model.d_model)
    header = (out / "best.toml").read_text().split("\n\n")[0]
    assert f"{pick.loss:.4f} +- {2 * pick.sd:.4f}" in header and "T/4" in header and "4T" in header
    loss, sd = predict_loss(plan, pick.model)
    assert loss == pytest.approx(pick.loss) and sd > 0

    trials = load_study(out, "p").get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= MIN_TRIALS
    base, first = load_spec(spec).base.model, trials[0].user_attrs["model"]
    assert (first["n_layers"], first["d_model"], first["n_heads"]) == (base.n_layers, base.d_model, base.n_heads)
    need = first_step(2)
    for t in done:  # no point from inside the warm-up: every finished run is past first_step
        steps = t.user_attrs["branch_steps"]
        assert min(length_for_stable(s, 0.2) for s in steps) >= need
        points = t.user_attrs["law_points"]
        assert points and all(p["step"] >= need for p in points)
        assert t.value == min(points, key=lambda p: -p["step"])["loss"]  # its value: the longest finished run
        assert t.user_attrs["tokens_per_sec"] > 0
    # The fit took every finished run that ended below the level of a table of token pairs, and no other.
    floor = forecast.floor
    assert floor is not None and 0 < floor < math.log(VOCAB)
    losses = [p["loss"] for t in done for p in t.user_attrs["law_points"]]
    assert forecast.law.points == sum(loss < floor for loss in losses) > 0
    # The corpus is small for 30 s: the repetition trial, when the search had time for it, ran on a part of it
    # (its points say which) and the law fitted R* from it.
    parts = [t for t in done if t.user_attrs.get("unique_tokens")]
    for t in parts:
        assert all(p["unique_tokens"] == t.user_attrs["unique_tokens"] for p in t.user_attrs["law_points"])
        assert t.user_attrs["unique_tokens"] < forecast.unique_tokens and "the repetition trial" in result.output
    assert forecast.law.r_star_fitted == bool(parts)
    assert not [p for p in (out / "trials").rglob("*") if p.is_file()]  # branches and main runs are removed

    # A pick more uncertain than max_2sd is not acted on: a paragraph with what S would do, the base config.
    assert too_loose(forecast, 2 * pick.sd + 1e-9, 16.0) is None
    loose = too_loose(forecast, 2 * pick.sd * 0.99, 16.0)
    assert loose is not None and "too loose" in loose and "--search-seconds" in loose
    fallback = tmp_path / "fallback.toml"
    write_plan(load_study(out, "p"), load_spec(spec), out, forecast, fallback, loose)
    kept = load_config(fallback)
    assert (kept.model.n_layers, kept.model.d_model) == (base.n_layers, base.d_model)
    assert kept.train.schedule == load_spec(spec).base.train.schedule  # the base's own, not the plan's WSD
    assert "planned no run: The fit is too loose" in fallback.read_text()
    assert json.loads((out / PLAN_NAME).read_text())["loose"] == loose


def test_a_search_budget_too_small_for_a_fit_says_so_in_a_paragraph(tmp_path: Path, text: Path) -> None:
    # A warm-up of 3,000 steps: the shortest finished run the fit admits is 6,000 steps, far beyond 8 s of search.
    spec = write_spec(tmp_path, text, "[target]\nseconds = 60\n", name="q", warmup=3000)
    out = tmp_path / "q"
    result = cli("search", "run", str(spec), "--out", str(out), "--search-seconds", "8")
    assert result.exit_code == 0, result.output
    text_out = " ".join(result.output.split())
    assert "No loss is predicted for the run of 60 s" in text_out and "plan for" not in text_out
    assert "+-" not in text_out  # no number with an uncertainty: nothing to trust
    plan = json.loads((out / PLAN_NAME).read_text())
    assert plan["law"] is None and plan["picks"] == [] and plan["shortfall"].startswith("No loss is predicted")
    best = (out / "best.toml").read_text()
    header = " ".join(line[2:] for line in best.split("\n\n")[0].splitlines())
    assert "planned no run" in header and "No loss is predicted" in header
    run = load_config(out / "best.toml")
    base = load_spec(spec).base
    assert run.model == base.model and run.train.schedule == base.train.schedule  # the base config, unchanged
    assert math.isclose(run.train.max_seconds, 60)


def test_max_2sd_and_switch_sd_are_checked() -> None:
    assert make_target("seconds", 300).max_2sd == 0.5 and make_target("seconds", 300, max_2sd=0.2).max_2sd == 0.2
    for bad in (0, -1, "wide", True):
        with pytest.raises(MlxllmError, match=r"max_2sd .* positive number"):
            make_target("seconds", 300, max_2sd=bad)
    assert make_target("seconds", 300).switch_sd == 2.0 and make_target("seconds", 300, switch_sd=0).switch_sd == 0
    for bad in (-1, "sure", True, float("inf")):
        with pytest.raises(MlxllmError, match=r"switch_sd .* number >= 0"):
            make_target("seconds", 300, switch_sd=bad)


# --- MLX's first compile ------------------------------------------------------------------------------------


def test_the_warm_up_trains_the_base_outside_the_search_and_leaves_nothing(tmp_path: Path, text: Path) -> None:
    # On the CPU backend MLX compiles its kernels with the C++ compiler at their first use: the warm-up runs
    # the base config's step and evaluation once, so that a time budget is not spent there.
    from mlxllm.data import prepare

    from mlxllm_search.warmup import needs_warm_up, warm_up

    spec = load_spec(write_spec(tmp_path, text, "[target]\nseconds = 30\n"))
    data = prepare(spec.base.train.data, spec.base.tokenizer, quiet=True)
    out = tmp_path / "s"
    out.mkdir()
    assert needs_warm_up()  # this machine runs MLX on its CPU
    warm = warm_up(spec, data, out)
    assert warm.seconds > 0 and list(out.iterdir()) == []
    assert warm.tokens_per_sec is not None and warm.tokens_per_sec > 0  # the base's speed, for the first design
