"""A search that optimises for the user's training run (`[target]`, --target-seconds): the curve fit, the
rungs and their clock, the search's own budget, best.toml ready for the target, free cap rejections.

Tiny models (1-2 layers, d_model 16-64) and targets of a few seconds: each search takes seconds.
"""

from __future__ import annotations

import math
import re
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import mlxllm.cli  # noqa: E402
from mlxllm import MlxllmError, load_config  # noqa: E402

from mlxllm_search import search  # noqa: E402
from mlxllm_search.curve import fit_curve, kendall_tau  # noqa: E402
from mlxllm_search.spec import load_spec, make_target  # noqa: E402
from mlxllm_search.speed import Point, Speed  # noqa: E402
from mlxllm_search.storage import counts  # noqa: E402
from mlxllm_search.target import HUGE_STEPS, Target, make_plan  # noqa: E402
from mlxllm_search.target_search import uncounted  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from test_search import base_tables, search_cache, text  # noqa: E402, F401 - the module's cache and corpus
from typer.testing import CliRunner  # noqa: E402

SPACE = """
[space]
n_layers = [1]
head_dim = [16]
n_heads = [1, 2]
kv_group = [1]
mlp_ratio = [2.0]
learning_rate = { min = 3e-3, max = 2e-2, log = true }
"""


def write_spec(tmp_path: Path, data: Path, *, tables: str, space: str = SPACE, name: str = "t") -> Path:
    spec = base_tables(name, data, "eval_interval = 50\n")
    path = tmp_path / f"{name}.toml"
    path.write_text(spec + textwrap.dedent(space) + textwrap.dedent(tables))
    return path


def cli(*args: str):
    mlxllm.cli._load_plugins()
    return CliRunner().invoke(mlxllm.cli.app, list(args))


# --- the pieces ------------------------------------------------------------------------------------------


def warm_seconds(output: str) -> float:
    """The seconds of MLX's first compile on this machine that a search printed (the warm-up, outside its
    budget), with a second for the rounding; 0 when it printed none (the kernels were there already)."""
    found = re.search(r"compiled its kernels for this machine in (\d+) s", output)
    return int(found.group(1)) + 1.0 if found else 0.0


def test_curve_fit_recovers_a_known_curve() -> None:
    a, b, c = 1.6, 8.0, 0.45
    x = np.geomspace(20, 400, 10)
    exact = fit_curve(x, a + b * x**-c)
    assert (
        exact.a == pytest.approx(a, abs=1e-3)
        and exact.b == pytest.approx(b, rel=1e-2)
        and exact.c == pytest.approx(c, abs=1e-3)
    )
    rng = np.random.default_rng(0)
    misses = []
    for _ in range(20):  # with evaluation noise: the 10x extrapolation lands within its stated uncertainty
        noisy = fit_curve(x, a + b * x**-c + rng.normal(0, 0.01, len(x)))
        mean, std = noisy.predict(4000)
        misses.append(abs(mean - (a + b * 4000**-c)) / std)
        assert 0 < std < 0.2 and 0 <= noisy.a <= 1.8
    assert np.mean(np.array(misses) < 2) >= 0.8
    few = fit_curve(x[:3], a + b * x[:3] ** -0.5, c=0.5)  # too few points: the exponent is given, (a, b) fitted
    assert few.c == 0.5 and few.a == pytest.approx(a, abs=1e-6) and few.predict(4000)[1] < 1e-6 + few.noise + 1e-3
    # A loss cannot fall below zero: a curve that would need a negative floor is held at zero.
    assert fit_curve(x, 3 - 0.5 * np.log(x)).a >= 0


def test_kendall_tau() -> None:
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant pairs, 1 discordant
    with pytest.raises(ValueError):
        kendall_tau([1], [1])


def test_speed_turns_steps_into_the_target_runs_seconds() -> None:
    # Steps of 10 ms, evaluations of 50 ms, 0.3 s of compilation in the first window of each training call.
    step_s, eval_s, start_s, tps = 0.010, 0.050, 0.3, 100
    points, elapsed, step = [], 0.0, 0
    for first in (True, False, False, True, False):
        elapsed += 20 * step_s + (start_s if first else 0.0) + (eval_s if step else 0.0)
        step += 20
        window = 20 * step_s + (start_s if first else 0.0)
        points.append(Point(step, elapsed, 20 * tps / window, 2.0, first))
    speed = Speed.measure(points, tokens_per_step=tps)
    assert speed.step_s == pytest.approx(step_s) and speed.eval_s == pytest.approx(eval_s)
    assert speed.start_s == pytest.approx(start_s)
    # The final run evaluates every 50 steps: 0.3 s, then 10 ms + 50 ms / 50 per step.
    assert speed.steps_at(11.3, eval_interval=50) == pytest.approx(1000)
    assert speed.seconds_at(1000, eval_interval=50) == pytest.approx(11.3)


def test_plan_of_rungs_follows_the_search_budget() -> None:
    full = make_plan(Target("seconds", 300), 1800, tokens_per_step=512)  # 6 targets: rungs up to the target
    assert full.fractions == pytest.approx((1 / 27, 1 / 9, 1 / 3, 1)) and full.confirm_top == 0
    assert full.ticks(1 / 27) == round(300_000 / 27)
    short = make_plan(Target("seconds", 3600), 1800, tokens_per_step=512)  # half a target: predict, then confirm
    assert short.fractions[-1] == pytest.approx(1 / 27) and short.confirm_fraction == pytest.approx(1 / 9)
    assert short.confirm_fractions == pytest.approx((1 / 9,))
    assert short.reserve_s == pytest.approx(2 * (1 / 9 - 1 / 27) * 3600 * 1.2)
    brief = make_plan(Target("seconds", 6), 36, tokens_per_step=512)  # no default rung shorter than a second
    assert brief.fractions == pytest.approx((1 / 3, 1)) and brief.ticks(1 / 3) == 2000
    steps = make_plan(Target("steps", 2000), None, tokens_per_step=512)
    assert steps.total_ticks == 2000 and steps.fractions[-1] == 1
    assert make_plan(Target("tokens", 512_000), None, tokens_per_step=512).total_ticks == 1000
    with pytest.raises(MlxllmError, match="cannot train even one trial"):
        make_plan(Target("seconds", 3600, min_fraction=0.1, max_fraction=0.5, confirm_top=0), 100, tokens_per_step=512)
    with pytest.raises(MlxllmError, match="too short"):
        make_plan(Target("steps", 3), None, tokens_per_step=512)


def test_target_settings_and_spec_errors(tmp_path: Path, text: Path) -> None:
    target = make_target("seconds", 2)
    assert (
        target.apply(load_config(None).train).max_seconds == 2
        and target.apply(load_config(None).train).max_steps == HUGE_STEPS
    )
    for kind, amount, message in (
        ("minutes", 2, "one of seconds"),
        ("steps", 2.5, "whole number"),
        ("seconds", -1, "positive"),
    ):
        with pytest.raises(MlxllmError, match=message):
            make_target(kind, amount)
    both = write_spec(tmp_path, text, tables='[target]\nseconds = 2\n[budget]\nkind = "steps"\namount = 20\n')
    with pytest.raises(MlxllmError, match="both \\[target\\] and \\[budget\\]"):
        load_spec(both)
    none = write_spec(tmp_path, text, tables="[target]\nmin_fraction = 0.1\n", name="n")
    with pytest.raises(MlxllmError, match="exactly one of seconds, steps, tokens"):
        load_spec(none)
    result = cli(
        "search",
        "run",
        str(write_spec(tmp_path, text, tables="", name="c")),
        "--target-seconds",
        "2",
        "--target-steps",
        "10",
        "--out",
        str(tmp_path / "c"),
    )
    assert result.exit_code == 1 and "Give one target" in result.output and isinstance(result.exception, SystemExit)
    result = cli(
        "search",
        "run",
        str(write_spec(tmp_path, text, tables="", name="d")),
        "--target-seconds",
        "100",
        "--search-seconds",
        "1",
        "--out",
        str(tmp_path / "d"),
    )
    assert result.exit_code == 1 and "too short to train even one trial" in result.output
    assert not (tmp_path / "d" / "study.journal").exists()  # refused before any study or training


def test_the_target_is_part_of_what_makes_trials_comparable(tmp_path: Path, text: Path) -> None:
    spec = write_spec(tmp_path, text, tables="[target]\nseconds = 2\n")
    base = load_spec(spec)
    rungs = write_spec(
        tmp_path, text, tables="[target]\nseconds = 2\nmin_fraction = 0.2\n[search]\nseconds = 30\n", name="r"
    )
    longer = write_spec(tmp_path, text, tables="[target]\nseconds = 3\n", name="l")
    assert load_spec(rungs).space_hash() == base.space_hash()  # other rungs, same predictions: resumable
    assert load_spec(longer).space_hash() != base.space_hash()


# --- searches ---------------------------------------------------------------------------------------------


def test_tiny_target_search_end_to_end_within_its_budget(tmp_path: Path, text: Path) -> None:
    # A 3 s target; 14 s of search: rungs at 1/9 and 1/3 of it, then the best one continued to the whole target.
    spec = write_spec(
        tmp_path,
        text,
        tables="""
        [target]
        seconds = 3
        min_fraction = 0.111
        max_fraction = 0.333
        confirm_top = 1
        [search]
        pruner = "successive-halving"
        startup_trials = 3
    """,
    )
    out, budget = tmp_path / "s", 14.0
    start = time.perf_counter()
    result = cli("search", "run", str(spec), "--out", str(out), "--search-seconds", str(budget), "--seed", "0")
    wall = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert wall < budget + 4 + warm_seconds(result.output), (
        f"the search ran {wall:.1f} s on a {budget:g} s budget"
    )  # +: the last evaluation, best.toml
    assert "pred@T" in result.output and "meas@T" in result.output and "Search cost" in result.output

    best = load_config(out / "best.toml")
    assert best.train.max_seconds == 3 and best.train.max_steps == HUGE_STEPS and best.train.max_tokens is None
    assert best.train.warmup_steps == 2 and best.train.batch_size == 4 and best.model.max_seq_len == 32
    assert "validation loss at the target" in (out / "best.toml").read_text()

    study = optuna.load_study(
        study_name="t",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))),
    )
    trials = study.get_trials()
    assert len(trials) >= 3
    plan = load_spec(spec).plan
    rungs = {plan.ticks(f) for f in plan.fractions}
    assert rungs == {333, 999}  # ms of the 3 s target run
    for t in trials:  # every trained trial carries its curve, speed and prediction, and is compared at the rungs
        if t.user_attrs.get("points"):
            assert t.user_attrs["predicted_std"] >= 0 and t.user_attrs["steps_at_target"] > 0
            assert set(t.intermediate_values) <= rungs
    # The best explored trial (the base config is always promoted, so there is one) is confirmed: continued in
    # its own run, the same curve, then on towards the target.
    confirms = [t for t in trials if "confirms" in t.user_attrs]
    assert len(confirms) == 1 and confirms[0].state == TrialState.COMPLETE
    c = confirms[0]
    src = trials[c.user_attrs["confirms"]]
    assert (
        c.params == src.params and c.user_attrs["points"][: len(src.user_attrs["points"])] == src.user_attrs["points"]
    )
    assert c.user_attrs["points"][-1][0] > src.user_attrs["points"][-1][0]
    if c.user_attrs.get("actual") is not None:  # got to the target (a loaded machine may cut it short)
        assert c.value == c.user_attrs["actual"] and c.user_attrs["rung"] == 1.0


def test_rungs_are_seconds_of_the_target_so_a_slow_architecture_gets_fewer_steps(tmp_path: Path, text: Path) -> None:
    spec = write_spec(
        tmp_path,
        text,
        tables="""
        [target]
        seconds = 4
        min_fraction = 0.25
        max_fraction = 0.25
        confirm_top = 0
        [search]
        pruner = "none"
    """,
        space=SPACE.replace("[1]", "[1, 3]").replace("[1, 2]", "[1, 4]").replace("[2.0]", "[2.0, 4.0]"),
    )
    small, slow = tmp_path / "small.toml", tmp_path / "slow.toml"
    small.write_text(
        "[model]\nn_layers = 1\nd_model = 16\nn_heads = 1\nmlp_ratio = 2.0\n[train]\nlearning_rate = 1e-2\n"
    )
    slow.write_text(
        "[model]\nn_layers = 3\nd_model = 64\nn_heads = 4\nmlp_ratio = 4.0\n[train]\nlearning_rate = 1e-2\n"
    )
    study = search(spec, out=tmp_path / "s", trials=2, seed_configs=[small, slow], show=False).study
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, [t.user_attrs for t in study.trials]
    by_width = {t.user_attrs["model"]["d_model"]: t for t in study.trials}
    fast, heavy = by_width[16], by_width[64]
    assert fast.user_attrs["speed"][0] < heavy.user_attrs["speed"][0]  # the bigger model's steps take longer
    assert heavy.user_attrs["steps"] < fast.user_attrs["steps"]  # ... so it reaches the same second in fewer
    for t in (fast, heavy):  # both trained to a quarter of the target run's 4 s, and compared there
        assert list(t.intermediate_values) == [1000]
        assert 0.25 <= t.user_attrs["fraction"] < 0.25 * 1.8
        assert t.user_attrs["steps_at_target"] > t.user_attrs["steps"] * 2


def test_over_cap_architectures_are_rejected_for_free_and_not_counted(tmp_path: Path, text: Path) -> None:
    # Two heads (18,560 parameters) are over the cap; the base config has two: rejected before training.
    spec = write_spec(
        tmp_path,
        text,
        tables="""
        [budget]
        kind = "steps"
        amount = 20
        eval_interval = 10
        [search]
        sampler = "random"
        pruner = "none"
        [search.caps]
        params = 10_000
    """,
    )
    study = search(spec, out=tmp_path / "s", trials=3, seed=1, show=False).study
    free = [t for t in study.trials if t.user_attrs.get("free")]
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert free and free[0].number == 0 and all(not t.intermediate_values for t in free)
    assert not any((tmp_path / "s" / "trials" / f"{t.number:04d}").exists() for t in free)  # never trained
    assert len(trained) == 3 and all(t.user_attrs["params"] <= 10_000 for t in trained)
    assert counts(study)[0] - uncounted(study) == 3


def test_shipped_target_spec_loads() -> None:
    spec = load_spec(Path(__file__).parents[1] / "configs" / "search" / "shakespeare-target.toml")
    assert spec.target is not None and spec.plan is not None and math.isclose(spec.plan.fractions[-1], 1.0)
    assert spec.base.train.max_seconds == spec.target.amount
