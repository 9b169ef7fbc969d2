from pathlib import Path

import mlx.core as mx
import pytest
from conftest import tiny_configs

from mlxllm import MlxllmError, ModelConfig, generate, load, train
from mlxllm.generate import generate_ids, sample_next
from mlxllm.model import build_model


def _without_cache(model, prompt, n, temperature, seed=0):
    """generate_ids's window and sampling, with the whole window run again for every token."""
    window = model.config.max_seq_len
    ids, key, start = list(prompt), mx.random.key(seed), max(0, len(prompt) - window)
    for _ in range(n):
        key, sub = mx.random.split(key)
        if len(ids) - start > window:
            start = len(ids) - window // 2
        logits = model(mx.array([ids[start:]]))[:, -1]
        ids.append(sample_next(logits, temperature, None, None, sub).item())
    return ids[len(prompt):]


def test_greedy_with_kv_cache_equals_greedy_without():
    model = build_model(ModelConfig(vocab_size=61, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=24,
                                    tie_embeddings=False), seed=5)
    for i, layer in enumerate((model.model.embed_tokens, model.lm_head)):  # livelier than a fresh init
        layer.weight = mx.random.normal(layer.weight.shape, key=mx.random.key(i))
    prompt = [3, 14, 15, 9, 26]
    # 40 tokens run past the 24-token window, so the cache is also refilled once.
    with_cache = generate_ids(model, prompt, 40, temperature=0)
    without = _without_cache(model, prompt, 40, temperature=0)
    assert with_cache == without and len(with_cache) == 40
    assert len(set(with_cache)) > 3
    sampled = [generate_ids(model, prompt, 40, temperature=1.0, seed=7), _without_cache(model, prompt, 40, 1.0, seed=7)]
    assert sampled[0] == sampled[1]


def test_sampling_respects_top_k_and_top_p():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(30):
        key = mx.random.key(seed)
        assert sample_next(logits, 1.0, 2, None, key).item() in (0, 1)
        assert sample_next(logits, 1.0, None, 0.6, key).item() in (0, 1)
        assert sample_next(logits, 1.0, None, 0.4, key).item() == 0
    assert sample_next(logits, 0.0, None, None, mx.random.key(0)).item() == 0


def test_generate_from_a_trained_run_is_seeded(corpus: Path, tmp_path: Path):
    m, t, k = tiny_configs(corpus, tmp_path / "run", max_steps=150, eval_interval=75)
    train(m, t, k, show_progress=False)
    model, tok = load(tmp_path / "run")
    a = generate(model, tok, "The cat", 60, temperature=0.5, seed=1)
    b = generate(model, tok, "The cat", 60, temperature=0.5, seed=1)
    assert a == b and len(a) > 20
    words = set(" ".join(open(corpus).read().split()[:2000]).split())
    produced = a.replace(".", " ").split()
    assert sum(w in words for w in produced) >= len(produced) // 2  # it writes the corpus' words


def test_load_explains_a_wrong_path(tmp_path: Path):
    with pytest.raises(MlxllmError, match="no checkpoint"):
        load(tmp_path)
