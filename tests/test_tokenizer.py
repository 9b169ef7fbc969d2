from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlxllm import MlxllmError
from mlxllm.config import TokenizerConfig
from mlxllm.tokenizer import ByteTokenizer, load_tokenizer, train_tokenizer


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
    result = CliRunner().invoke(app, ["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(out)])
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("a dog finds")) == "a dog finds"
