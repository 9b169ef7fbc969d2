"""The plan for the user's run (mlxllm_search.forecast, mlxllm_search.throughput): the speed model, the picks
for T/4 .. 4T, the data verdict, the too-small-budget paragraph and the JSON record. Synthetic trials on a
known law and speed: no training, a few seconds."""

from __future__ import annotations

import json

from mlxllm import MlxllmError, ModelConfig

import numpy as np
import pytest
from mlxllm_search.forecast import Forecast, make_forecast, predict_loss, predict_model, render
from mlxllm_search.scaling import Point, effective_tokens, law_params, split_points
from mlxllm_search.throughput import PRIOR_SD, SLOPE_RANGE, RunLength, fit_throughput

FLOP_RATE = 1e11  # this synthetic machine's FLOPs per second: 4 x 128 trains at about 17,000 tokens/s
SEQ = 256
LENGTH = RunLength("seconds", 3600, tokens_per_step=16 * SEQ)
CANDIDATES = [
    ModelConfig(vocab_size=256, n_layers=n, d_model=d, n_heads=4)
    for n in (2, 4, 6, 8)
    for d in (64, 128, 192, 256, 384)
]
TRAINED = [CANDIDATES[i] for i in (0, 6, 8, 12, 14, 19)]  # 0.1M to 3.2M parameters without embeddings


def speed_of(model: ModelConfig) -> float:
    return FLOP_RATE / model.flops_per_token(SEQ)


def true_loss(model: ModelConfig, tokens: float, unique: float) -> float:
    return 1.0 + 75.0 * law_params(model) ** -0.4 + 50.0 * effective_tokens(tokens, unique) ** -0.3


def study(unique: float, seconds: float = 40.0, trained: list[ModelConfig] = TRAINED, seed: int = 0) -> list[Point]:
    """Each trained architecture's WSD run of `seconds`, with cooldown branches at 1/8 .. 1 of it."""
    rng = np.random.default_rng(seed)
    points = []
    for t, m in enumerate(trained):
        offset = rng.normal(0, 0.01)
        for f in (1 / 8, 1 / 4, 1 / 2, 1):
            d = f * seconds * speed_of(m)
            loss = true_loss(m, d, unique) + offset + rng.normal(0, 0.01)
            points.append(
                Point(t, law_params(m), d, loss, step=max(1, int(d / LENGTH.tokens_per_step)), warmup_steps=10)
            )
    return points


def measured_speed(trained: list[ModelConfig] = TRAINED):
    rng = np.random.default_rng(1)
    return fit_throughput([(m, speed_of(m) * rng.lognormal(0, 0.03)) for m in trained for _ in range(2)], SEQ)


def plan(unique: float, **kw) -> Forecast:
    return make_forecast(study(unique, **kw), unique, CANDIDATES, measured_speed(), LENGTH, search_seconds=360)


def test_speed_is_measured_or_predicted_from_flops():
    speed = measured_speed()
    rate, sd = speed.tokens_per_second(TRAINED[2])
    assert rate == pytest.approx(speed_of(TRAINED[2]), rel=0.1) and sd < 0.1
    for m in (CANDIDATES[1], CANDIDATES[18]):  # never measured
        rate, sd = speed.tokens_per_second(m)
        assert rate == pytest.approx(speed_of(m), rel=0.15) and 0 < sd < PRIOR_SD
    assert speed.slope == pytest.approx(-1.0, abs=0.15)
    one = fit_throughput([(TRAINED[0], 10_000.0)], SEQ)
    assert one.slope == -1.0 and one.tokens_per_second(TRAINED[1])[1] > PRIOR_SD
    assert speed.tokens(CANDIDATES[0], RunLength("steps", 100, 4096)) == (409_600, 0.0)
    assert speed.tokens(CANDIDATES[0], LENGTH, 2.0)[0] == pytest.approx(
        7200 * speed.tokens_per_second(CANDIDATES[0])[0]
    )
    with pytest.raises(MlxllmError):
        RunLength("minutes", 10, 4096)


def test_two_close_sizes_timed_flat_do_not_promise_a_big_model_their_speed():
    # Two small sizes whose speeds came out equal (one on a busier machine): a line through them is flat, and
    # would give a model with many times their FLOPs their speed. The slope is held at no flatter than -0.5.
    small, bigger = TRAINED[0], TRAINED[1]
    speed = fit_throughput([(small, 20_000.0), (bigger, 20_500.0)], SEQ)
    assert speed.slope == SLOPE_RANGE[1]
    big = max(CANDIDATES, key=lambda m: m.flops_per_token(SEQ))
    ratio = big.flops_per_token(SEQ) / bigger.flops_per_token(SEQ)
    assert ratio > 4 and speed.tokens_per_second(big)[0] <= 20_500.0 * ratio**-0.5 * 1.05


def test_longer_runs_pick_bigger_models_and_mark_extrapolation():
    p = plan(unique=1e12)
    assert p.law is not None and len(p.picks) == 5 and len(p.predictions) == len(CANDIDATES)
    sizes = [law_params(x.model) for x in p.picks]
    assert sizes[-1] > sizes[0], sizes  # 4T: a larger model than T/4
    truth = {x.multiple: true_loss(x.model, x.tokens, 1e12) for x in p.picks}
    assert all(abs(x.loss - truth[x.multiple]) < 2 * x.sd for x in p.picks)
    assert p.pick(4.0).extrapolation  # beyond the largest model measured or the longest run
    assert [x.loss for x in p.predictions] == sorted(x.loss for x in p.predictions)
    text = render(p)
    assert "T/4" in text and "4T" in text and "+-" in text and "extrapolation" in text


def test_data_verdict_fires_on_a_small_corpus_only():
    small, large = plan(unique=2e5), plan(unique=1e12)
    assert small.verdict.fires and small.verdict.epochs > 4 and small.verdict.text_gain > small.verdict.bigger_gain
    assert "more text would help more than a bigger model" in render(small)
    assert not large.verdict.fires and large.verdict.text_gain == pytest.approx(0.0, abs=1e-9)
    assert "more text would help more" not in render(large)


def test_too_few_points_give_the_paragraph_not_a_number():
    p = make_forecast(study(1e12, trained=TRAINED[:2]), 1e12, CANDIDATES, measured_speed(), LENGTH, search_seconds=60)
    assert p.law is None and p.picks == () and p.verdict is None
    assert (
        "No loss is predicted" in p.shortfall
        and "model sizes (parameter counts 10% apart): 2 measured, 3 needed" in p.shortfall
    )
    assert "search budget of about" in p.shortfall and "+-" not in render(p)
    assert render(p) == p.shortfall
    with pytest.raises(MlxllmError, match="no fit"):
        predict_loss(json.loads(json.dumps(p.to_dict())), CANDIDATES[0])


def test_runs_inside_the_warmup_are_left_out_and_priced():
    short = study(1e12, seconds=0.5)  # a few steps each: all inside or just after the 10-step warm-up
    assert all(p.step < 30 for p in short)
    p = make_forecast(short, 1e12, CANDIDATES, measured_speed(), LENGTH, search_seconds=30)
    assert p.law is None and "left out" in p.shortfall and "measured no finished loss" in p.shortfall
    budget = float(p.shortfall.split("search budget of about ")[1].split(" s")[0].replace(",", ""))
    assert budget > 30


def test_runs_no_better_than_a_table_of_pairs_are_left_out_and_priced():
    points = study(1e12)
    past = split_points(points)[0]  # past the warm-up
    floor = sorted(p.loss for p in past)[-2]  # the two highest of them are not below it
    below = split_points(points, floor=floor)[0]
    assert 0 < len(below) < len(past)
    p = make_forecast(points, 1e12, CANDIDATES, measured_speed(), LENGTH, search_seconds=360, floor=floor)
    assert p.law is not None and p.law.points == len(below)  # the rest is fitted
    everything = make_forecast(points, 1e12, CANDIDATES, measured_speed(), LENGTH, search_seconds=360, floor=0.5)
    assert everything.law is None and "table of token pairs" in everything.shortfall
    assert "measured no finished loss" in everything.shortfall and "below 0.500" in everything.shortfall
    # The budget it names grows with how far above the level the runs ended.
    budgets = []
    for level in (min(q.loss for q in points) - 0.05, min(q.loss for q in points) - 0.5):
        text = make_forecast(points, 1e12, CANDIDATES, measured_speed(), LENGTH, search_seconds=360, floor=level)
        assert text.law is None
        budgets.append(float(text.shortfall.split("search budget of about ")[1].split(" s")[0].replace(",", "")))
    assert 360 < budgets[0] < budgets[1]
    lone = [min(points, key=lambda q: q.loss)]  # one run in all: no trend to go on, a rough factor still
    text = make_forecast(lone, 1e12, CANDIDATES, measured_speed(), LENGTH, search_seconds=60, floor=0.5).shortfall
    assert text is not None and "search budget of about" in text


def test_json_record_predicts_any_architecture_the_same():
    p = plan(unique=3e6)
    record = json.loads(json.dumps(p.to_dict()))
    assert Forecast.from_dict(record) == p
    stranger = ModelConfig(vocab_size=256, n_layers=3, d_model=160, n_heads=5)  # not a candidate, never trained
    direct = predict_model(p.law, p.speed, p.length, stranger)
    assert predict_loss(record, stranger) == (direct.loss, direct.sd)
    assert predict_loss(record, stranger, multiple=4.0)[0] < direct.loss


def test_the_pick_replaces_the_base_only_when_clearly_better():
    """[target] switch_sd: the pick must beat the base by that many sd of the difference. A tiny base is far
    worse than the pick at an hour (the gain many times its sd): replaced. The pick as its own base, or a base
    the law cannot tell from it: kept, with the paragraph. switch_sd 0: the pick as it is."""
    from mlxllm_search.plan_gates import no_better

    p = plan(unique=1e12)
    best = p.pick(1.0)
    tiny = CANDIDATES[0]
    b = p.predict(tiny)
    gain, sd = p.law.difference((b.params, b.tokens), (best.params, best.tokens))
    assert gain > 2 * sd > 0 and no_better(p, tiny, 2.0) is None
    assert no_better(p, best.model, 2.0) is None  # the pick is the base: nothing to replace
    kept = no_better(p, tiny, gain / sd * 1.01)
    assert kept and "cannot tell its pick from the base" in kept and "switch_sd" in kept
    neighbour = min((m for m in CANDIDATES if m != best.model), key=lambda m: abs(p.predict(m).loss - best.loss))
    assert no_better(p, neighbour, 2.0) is not None and no_better(p, neighbour, 0.0) is None


def test_a_loose_pick_says_what_would_narrow_it():
    """[target] max_2sd: a pick wider than it gets the paragraph. Where the fit itself is loose, a search about
    as much longer as it needs to pin the fit (more than the seconds spent); where each run's own scatter
    around the law is wider than max_2sd, that no longer search of the same runs narrows it, and the max_2sd
    that would act (never a budget the search already had)."""
    from dataclasses import replace

    from mlxllm_search.plan_gates import too_loose

    p = plan(unique=1e12)
    best = p.pick(1.0)
    assert too_loose(p, 2 * best.sd * 1.01, 360.0) is None
    tight = replace(p, law=replace(p.law, sigma=0.2 * best.sd / p.law.scale))  # the floor: 0.4 of the 2 sd
    loose = too_loose(tight, best.sd, 360.0)  # max_2sd: half the pick's 2 sd, above the floor
    need = float(loose.split("A search of roughly ")[1].split(" s")[0].replace(",", ""))
    assert need > 360.0 * 3 and f"{2 * tight.law.scale * tight.law.sigma:.2f} in 2 sd" in loose
    wide = replace(p, law=replace(p.law, sigma=0.8 * best.sd / p.law.scale))  # the floor: 1.6 sd, above max_2sd
    loose = too_loose(wide, best.sd, 360.0)
    assert "would not narrow it" in loose and "A search of roughly" not in loose
    floor = 2 * wide.law.scale * wide.law.sigma
    assert f"a max_2sd above {floor:.2f}" in loose


def test_a_loose_pick_names_the_budget_whose_longer_runs_narrow_it():
    """The budget the paragraph names is the least whose trials' runs, that many times longer, leave the pick
    AIM of max_2sd in 2 sd: at one time as long the sd is the prediction's own, and it falls as the runs near
    the target's, toward the scatter of one run."""
    from mlxllm_search.plan_gates import AIM, longer_runs, too_loose

    p = plan(unique=1e12)
    best, law = p.pick(1.0), p.law
    _, sd = law.predict(best.params, best.tokens)
    assert law.sd_with_longer_runs(best.params, best.tokens, 1.0) == pytest.approx(sd, rel=1e-12)
    sds = [law.sd_with_longer_runs(best.params, best.tokens, k) for k in (1.0, 2.0, 4.0, 16.0, 1e4)]
    assert all(a >= b for a, b in zip(sds, sds[1:])) and sds[0] > sds[-1]
    assert sds[-1] >= law.scale * law.sigma
    max_2sd = 1.5 * best.sd  # 0.75 of the pick's 2 sd, above the floor
    factor = longer_runs(law, best, AIM * max_2sd)
    assert factor > 1 and 2 * law.sd_with_longer_runs(best.params, best.tokens, factor) <= AIM * max_2sd * 1.001
    assert 2 * law.sd_with_longer_runs(best.params, best.tokens, factor / 1.05) > AIM * max_2sd
    loose = too_loose(p, max_2sd, 100.0)
    need = float(loose.split("A search of roughly ")[1].split(" s")[0].replace(",", ""))
    assert need == pytest.approx(100.0 * factor, abs=1.0) and f"about {AIM * max_2sd:.2f} in 2 sd" in loose
    with pytest.raises(ValueError, match="at least 1"):
        law.sd_with_longer_runs(best.params, best.tokens, 0.5)


def test_the_planners_paragraphs_reach_the_terminal_whole():
    """The paragraphs name settings in TOML's table syntax; printed, "[target] max_2sd" stays, not " max_2sd"."""
    import io

    from mlxllm_search.plan_gates import too_loose
    from mlxllm_search.plan_lines import say
    from rich.console import Console

    p = plan(unique=1e12)
    loose = too_loose(p, p.pick(1.0).sd, 100.0)
    out = io.StringIO()
    say(Console(file=out, width=10_000), loose)
    assert "[target] max_2sd" in loose and out.getvalue().strip() == loose
