"""The search's default pruner, Hyperband, stops hopeless trials early: a tiny search where it has to.

One model shape (1 layer, d_model 32), so the whole search costs one MLX compile per trial and a few
seconds. The base config learns fast (learning rate 1e-2); the seed configs barely move (1e-5), so
Hyperband has something to prune wherever one of them shares a bracket with a better trial.
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from mlxllm_search import search  # noqa: E402
from mlxllm_search.run import make_pruner  # noqa: E402
from mlxllm_search.spec import load_spec  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from test_search import base_tables  # noqa: E402

BUDGET, EVAL_EVERY = 90, 10  # Hyperband's rungs: steps 10, 30 and 90 (reduction factor 3)
HOPELESS_LRS = (1e-5, 1.2e-5, 1.5e-5, 2e-5)
WORDS = ["the cat", "a dog", "my friend", "sees", "likes", "follows", "the red ball", "an old book", "the river"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path / "cache"))


def write_spec(tmp_path: Path) -> Path:
    rng = random.Random(0)
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(1500)))
    spec = tmp_path / "hyperband.toml"
    # No `pruner` under [search]: the default is under test.
    spec.write_text(
        base_tables("hyperband", data)
        + textwrap.dedent(f"""
        [space]
        n_layers = [1]
        head_dim = [16]
        n_heads = [2]
        kv_group = [1]
        mlp_ratio = [2.0]
        learning_rate = {{ min = 1e-5, max = 1e-2, log = true }}
        [budget]
        kind = "steps"
        amount = {BUDGET}
        eval_interval = {EVAL_EVERY}
        [search]
        objectives = ["val_loss"]
        sampler = "tpe"
    """)
    )
    return spec


def test_default_hyperband_prunes_hopeless_trials_before_the_full_budget(tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path)
    spec = load_spec(spec_path)
    assert spec.settings.pruner == "hyperband"
    pruner = make_pruner(spec)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)

    seeds = []
    for i, lr in enumerate(HOPELESS_LRS):
        p = tmp_path / f"slow{i}.toml"
        p.write_text(
            f"[model]\nn_layers = 1\nd_model = 32\nn_heads = 2\nmlp_ratio = 2.0\n[train]\nlearning_rate = {lr}\n"
        )
        seeds.append(p)
    study = search(spec_path, out=tmp_path / "s", trials=1 + len(seeds), seed_configs=seeds, show=False).study
    trials = study.get_trials()
    assert len(trials) == 1 + len(seeds)

    base = trials[0]
    assert base.params["learning_rate"] == 1e-2
    assert base.state == TrialState.COMPLETE and max(base.intermediate_values) == BUDGET
    assert sorted(base.intermediate_values) == list(range(EVAL_EVERY, BUDGET + 1, EVAL_EVERY))

    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.number, t.state, t.intermediate_values) for t in trials]
    for t in pruned:
        assert "rejected" not in t.user_attrs  # pruned on its loss, not over a cap
        assert t.params["learning_rate"] in HOPELESS_LRS
        last = max(t.intermediate_values)
        # Stopped at one of Hyperband's rungs, before the full budget, and trained no further.
        assert last < BUDGET and last in (EVAL_EVERY, 3 * EVAL_EVERY), t.intermediate_values
        assert sorted(t.intermediate_values) == list(range(EVAL_EVERY, last + 1, EVAL_EVERY))
        # It was pruned for being worse than the base at the same step.
        assert t.intermediate_values[last] > base.intermediate_values[last]
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert max(t.intermediate_values) == BUDGET


class _AlwaysPrune(optuna.pruners.BasePruner):
    """A pruner that would stop every trial at every evaluation."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_a_trial_at_its_last_evaluation_is_finished_not_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlxllm_search.run as run_mod

    monkeypatch.setattr(run_mod, "make_pruner", lambda spec: _AlwaysPrune())
    spec_path = write_spec(tmp_path)
    spec_path.write_text(spec_path.read_text().replace(f"amount = {BUDGET}", f"amount = {2 * EVAL_EVERY}"))
    trials = search(spec_path, out=tmp_path / "s", trials=2, show=False).study.get_trials()
    # Each trial is pruned at its first evaluation (step 10), before its last (step 20).
    for t in trials:
        assert t.state == TrialState.PRUNED and max(t.intermediate_values) == EVAL_EVERY, t.intermediate_values
    spec_path.write_text(
        spec_path.read_text().replace(f"eval_interval = {EVAL_EVERY}", f"eval_interval = {2 * EVAL_EVERY}")
    )
    trials = search(spec_path, out=tmp_path / "t", trials=2, show=False).study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # its only evaluation is its last
