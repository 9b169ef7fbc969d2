import json
from pathlib import Path

from mlxllm import MlxllmError, ModelConfig, RunConfig, generate, load, train
from mlxllm.generate import generate_ids, sample_next
from mlxllm.model import KVCache, build_model

import mlx.core as mx
import pytest
from conftest import tiny_configs


def _without_cache(model, prompt, n, temperature, seed=0, top_k=None, top_p=None):
    """generate_ids's window and sampling, with the whole window run again for every token."""
    window = model.config.max_seq_len
    ids, key, start = list(prompt), mx.random.key(seed), max(0, len(prompt) - window)
    for _ in range(n):
        key, sub = mx.random.split(key)
        if len(ids) - start > window:
            start = len(ids) - window // 2
        logits = model(mx.array([ids[start:]]))[:, -1]
        ids.append(sample_next(logits, temperature, top_k, top_p, sub).item())
    return ids[len(prompt) :]


def test_greedy_with_kv_cache_equals_greedy_without():
    model = build_model(
        ModelConfig(
            vocab_size=61, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=24, tie_embeddings=False
        ),
        seed=5,
    )
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
    train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False)
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


def _lively(cfg: ModelConfig, seed: int = 5):
    model = build_model(cfg, seed=seed)
    for i, layer in enumerate((model.model.embed_tokens, model.lm_head)):
        layer.weight = mx.random.normal(layer.weight.shape, key=mx.random.key(i))
    return model


SMALL = dict(vocab_size=61, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, tie_embeddings=False)


def test_cache_growing_past_its_step_and_restarting_gives_the_ids_of_no_cache(monkeypatch):
    monkeypatch.setattr(KVCache, "step", 8)  # the buffers grow 8 positions at a time: several times per window
    model = _lively(ModelConfig(**SMALL, max_seq_len=30))
    prompt = [3, 14, 15, 9, 26, 5, 35]
    # 50 tokens: the window of 30 fills, decoding restarts from its last 15, and fills it again.
    for temperature, top_k, top_p, seed in ((0.0, None, None, 0), (1.0, None, None, 7), (0.9, 8, 0.9, 3)):
        cached = generate_ids(model, prompt, 50, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        assert cached == _without_cache(model, prompt, 50, temperature, seed=seed, top_k=top_k, top_p=top_p), (
            temperature,
            top_k,
            top_p,
        )
    assert len(set(cached)) > 3
    # A prompt longer than the window starts from its last max_seq_len ids.
    long_prompt = [(7 * i) % 61 for i in range(40)]
    assert generate_ids(model, long_prompt, 12, temperature=0) == _without_cache(model, long_prompt, 12, 0.0)


def test_prefill_then_decode_equals_a_full_forward(monkeypatch):
    monkeypatch.setattr(KVCache, "step", 8)
    model = _lively(ModelConfig(**SMALL, max_seq_len=32))
    ids = mx.array([[(5 * i + 2) % 61 for i in range(20)]])
    full = model(ids)
    # Eager: a 6-token prefill, then one token at a time (the buffers grow at 8 and 16).
    cache = model.make_cache()
    steps = [model(ids[:, :6], cache)] + [model(ids[:, i : i + 1], cache) for i in range(6, 20)]
    assert cache[0].offset == 20 and cache[0].capacity == 24
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-4).item()
    # The fixed-shape step a compiled decode runs: whole buffers, the position and mask as arrays.
    cache = model.make_cache()
    model(ids[:, :6], cache)
    for i in range(6, 20):
        for c in cache:
            c.reserve(1)
        at, visible = mx.array([i], dtype=mx.int32), KVCache.visible_mask(i, 1, cache[0].capacity)
        fixed = [KVCache.fixed(c.keys, c.values, at, visible) for c in cache]
        logits = model(ids[:, i : i + 1], fixed)
        assert mx.allclose(logits[:, 0], full[:, i], atol=1e-4).item(), i
        for c, f in zip(cache, fixed):
            c.keys, c.values, c.offset = f.keys, f.values, i + 1


def test_kv_cache_preallocates_and_keeps_what_it_holds():
    cache = KVCache(step=4)
    parts = [mx.random.normal((1, 2, n, 8), key=mx.random.key(n)) for n in (3, 1, 1, 6)]
    for p in parts:
        keys, values = cache.update(p, -p)
    assert cache.offset == 11 and cache.capacity == 12 and keys.shape == (1, 2, 11, 8)
    assert mx.array_equal(keys, mx.concatenate(parts, axis=2)).item() and mx.array_equal(values, -keys).item()
    cache.reserve(2)  # past the buffer: it grows by a whole step and keeps the tokens
    assert cache.capacity == 16 and mx.array_equal(cache.keys[..., :11, :], keys).item()
    assert KVCache.visible_mask(2, 2, 5).tolist() == [[True, True, True, False, False], [True] * 4 + [False]]


def test_rope_at_equals_mx_fast_rope_at_int_and_array_offsets():
    from mlxllm import ops

    rope = ops.Rope(64, 16, 10000.0)
    x = mx.random.normal((1, 3, 4, 16), key=mx.random.key(0))  # (B, L, H, D)
    for offset in (0, 9):
        want = mx.fast.rope(x.transpose(0, 2, 1, 3), 16, traditional=False, base=10000.0, scale=1.0, offset=offset)
        assert mx.allclose(rope.at(x, offset=offset, end=offset + 3), want, atol=1e-5).item()
        at = mx.array([offset], dtype=mx.int32)
        assert mx.allclose(rope.at(x[:, :1], offset=at, end=64), want[:, :, :1], atol=1e-5).item()


def test_decoding_follows_the_models_current_weights():
    model = _lively(ModelConfig(**SMALL, max_seq_len=24))
    prompt = [1, 2, 3]
    assert generate_ids(model, prompt, 10, temperature=0) == _without_cache(model, prompt, 10, 0.0)
    model.lm_head.weight = mx.random.normal(model.lm_head.weight.shape, key=mx.random.key(42))
    assert generate_ids(model, prompt, 10, temperature=0) == _without_cache(model, prompt, 10, 0.0)


def test_bench_generate_reports_mlxllm_and_mlx_lm(tmp_path: Path):
    from mlxllm.bench.generate import mlx_lm_available
    from mlxllm.cli import app

    from typer.testing import CliRunner

    out = tmp_path / "bench.json"
    r = CliRunner().invoke(
        app,
        [
            "bench",
            "generate",
            "--layers",
            "2",
            "--d-model",
            "64",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "61",
            "--context",
            "32",
            "--prompt-tokens",
            "6",
            "--tokens",
            "12",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    rows = {row["impl"]: row for row in result["rows"]}
    assert "decode tokens/s" in r.output and "mlxllm" in r.output and "CPU" in result["system"]
    assert rows["mlxllm"]["decode_tps"] > 0 and rows["mlxllm"]["prompt_tps"] > 0
    if mlx_lm_available() is None:
        assert set(rows) == {"mlxllm", "mlx-lm"} and "mlx-lm" in r.output
        assert rows["mlxllm"]["agrees_with_mlx_lm"] == 12  # the same greedy ids from the same weights
    else:
        assert set(rows) == {"mlxllm"} and "mlx-lm skipped" in r.output
    r = CliRunner().invoke(app, ["bench", "generate", "--context", "16", "--prompt-tokens", "8", "--tokens", "12"])
    assert r.exit_code == 1 and "context window" in r.output
