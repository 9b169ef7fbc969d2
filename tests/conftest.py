"""Shared fixtures: a private cache directory, a generated corpus and tiny configs."""

from __future__ import annotations

import os
import random
from pathlib import Path

import mlxllm  # noqa: F401 - loads the optimized BLAS before mlx.core

import pytest

SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our neighbour", "the king"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "remembers", "carries", "greets"]
OBJECTS = ["the red ball", "a green apple", "the river", "an old book", "the tall tree", "a quiet song", "the morning"]
ENDINGS = [".", " today.", " again.", " in the garden.", " at night."]


def make_corpus(n_sentences: int, seed: int = 0) -> str:
    """Sentences from a small grammar: easy to learn, far below its unigram entropy."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
        lines.append(s[0].upper() + s[1:])
    return "\n".join(" ".join(lines[i : i + 4]) for i in range(0, len(lines), 4)) + "\n"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache")
    os.environ["MLXLLM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "grammar.txt"
    path.write_text(make_corpus(3000))
    return path


def tiny_configs(data: Path | str, out: Path, **train_overrides):
    """A model small enough to train a few hundred steps in seconds on 2 CPU cores."""
    from mlxllm import ModelConfig, TokenizerConfig, TrainConfig

    model = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64)
    train = dict(
        data=str(data),
        out_dir=str(out),
        batch_size=8,
        learning_rate=3e-3,
        warmup_steps=10,
        max_steps=40,
        eval_interval=20,
        eval_batches=4,
        log_interval=10,
        sample_tokens=0,
    )
    train.update(train_overrides)
    return model, TrainConfig(**train), TokenizerConfig(kind="byte")
