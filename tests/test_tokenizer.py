import random
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, train
from mlxllm.config import TokenizerConfig
from mlxllm.tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer, training_sentences

import pytest
from conftest import make_corpus, tiny_configs
from typer.testing import CliRunner


def test_bpe_round_trips_unseen_text_through_byte_fallback(corpus: Path, tmp_path: Path):
    tok = train_tokenizer(iter(corpus.read_text().split("\n")), TokenizerConfig(kind="bpe", vocab_size=400))
    assert 256 < tok.vocab_size <= 400
    text = "The cat sees   the river.\n\tZebra ☃ ünïcödé 123\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    common = "The cat sees the red ball in the garden."
    assert len(tok.encode(common)) < len(common.encode()) / 2  # it learned the words
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo\n")) == "héllo\n"
    assert tok.eos_id == 256 and tok.vocab_size == 257


def test_config_is_validated():
    with pytest.raises(MlxllmError, match="kind"):
        TokenizerConfig(kind="wordpiece")
    with pytest.raises(MlxllmError, match="vocab_size"):
        TokenizerConfig(vocab_size=100)


def test_tokenizer_train_command(corpus: Path, tmp_path: Path):
    from mlxllm.cli import app

    out = tmp_path / "tok"
    result = CliRunner().invoke(
        app, ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("a dog finds")) == "a dog finds"


def _one_line(kind: str) -> str:
    if kind == "english":  # ~300 KB of sentences, single spaces, no line break
        return make_corpus(7000).replace("\n", " ")
    rng = random.Random(0)  # ~256 KB of Japanese, emoji and accented words, no line break
    words = ["日本語", "のテキスト", "東京", "は", "美しい", "🎉", "🐍", "café", "naïve", "crème", "señor", "。"]
    return "".join(rng.choice(words) for _ in range(40_000))


@pytest.mark.parametrize("kind", ["english", "cjk"])
def test_a_corpus_of_one_long_line_trains_with_bpe(tmp_path: Path, kind: str):
    text = _one_line(kind)
    path = tmp_path / "one-line.txt"
    path.write_text(text)
    assert "\n" not in text and len(text.encode()) > 250_000
    m, t, _ = tiny_configs(path, tmp_path / "run", max_steps=30, eval_interval=15)
    result = train(
        RunConfig(model=m, tokenizer=TokenizerConfig(kind="bpe", vocab_size=512), train=t), show_progress=False
    )
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    tok = load_tokenizer(tmp_path / "run")
    assert tok.vocab_size > 300  # merges were learned, not just the byte pieces
    pieces = list(training_sentences(text))
    assert len(pieces) > 10 and "".join(pieces) == text
    if kind == "english":  # cut at spaces: the line encodes as its pieces do
        assert tok.encode(text) == [i for p in pieces for i in tok.encode(p)]
