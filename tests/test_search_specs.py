"""The shipped example search specs (configs/search/*.toml): each admits its own base architecture, within its
caps, so the default is trial 0 and a search can only improve on it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("optuna")

from mlxllm.tokenizer import ByteTokenizer  # noqa: E402

from mlxllm_search.plan_search import architecture, plan_candidates  # noqa: E402
from mlxllm_search.space import TRAIN_BYTES_PER_PARAM  # noqa: E402
from mlxllm_search.spec import load_spec  # noqa: E402
from mlxllm_search.throughput import model_key  # noqa: E402

SPECS = sorted((Path(__file__).parents[1] / "configs" / "search").glob("*.toml"))


def test_there_are_shipped_specs() -> None:
    assert {p.stem for p in SPECS} >= {"tiny", "shakespeare", "shakespeare-target"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_each_shipped_spec_admits_its_base(path: Path) -> None:
    spec = load_spec(path)
    assert spec.base.tokenizer.kind == "byte"  # so the vocabulary, and the parameter count, is known here
    vocab = ByteTokenizer().vocab_size
    assert spec.space.params_of(spec.base) is not None, f"{path.name}: the base is outside [space]"
    n = replace(spec.base.model, vocab_size=vocab).num_params()
    cap = spec.settings.caps.params
    assert cap is None or n <= cap, f"{path.name}: the base has {n:,} parameters, over the cap of {cap:,}"
    memory = spec.settings.caps.memory_gb
    assert memory is None or n * TRAIN_BYTES_PER_PARAM / 1e9 <= memory  # weights, gradients, optimizer state
    # The fit planner's design enumerates the space: the base is one of its candidates, as the space builds it.
    base = architecture(spec, spec.base.model, vocab)
    assert base is not None and base.num_params() == n
    assert model_key(base) in {model_key(m) for m in plan_candidates(spec, vocab)}
