import json
from pathlib import Path

from mlxllm import MlxllmError, RunConfig, train
from mlxllm import corpus as corpus_mod
from mlxllm import data as data_mod
from mlxllm.config import TokenizerConfig

import numpy as np
import pytest
from conftest import tiny_configs

BYTE = TokenizerConfig(kind="byte")


def test_file_folder_and_glob(tmp_path: Path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / "sub" / "c.bin").write_bytes(b"\0\1")
    assert corpus_mod.open_corpus(tmp_path / "a.txt", quiet=True).files == [tmp_path / "a.txt"]
    assert corpus_mod.open_corpus(tmp_path, quiet=True).files == [tmp_path / "a.txt", tmp_path / "sub" / "b.md"]
    assert corpus_mod.open_corpus(str(tmp_path / "**" / "*.md"), quiet=True).files == [tmp_path / "sub" / "b.md"]


def test_default_corpus_is_offline_and_sizeable():
    files = corpus_mod.default_corpus()
    assert files and all(f.exists() for f in files)
    assert sum(f.stat().st_size for f in files) >= 1_000_000


def test_tokens_cached_by_content_and_split_deterministic(corpus: Path, tmp_path: Path):
    d1 = data_mod.prepare(corpus, BYTE)
    assert d1.train.dtype == np.uint16 and isinstance(d1.train, np.memmap)
    assert abs(len(d1.val) / (len(d1.train) + len(d1.val)) - 0.1) < 0.01
    stamp = (d1.directory / "train.bin").stat().st_mtime_ns
    d2 = data_mod.prepare(corpus, BYTE)
    assert d2.directory == d1.directory and (d2.directory / "train.bin").stat().st_mtime_ns == stamp
    copy = tmp_path / "copy.txt"
    copy.write_text(corpus.read_text())
    d3 = data_mod.prepare(copy, BYTE)  # same content, another path: same cache
    assert d3.directory == d1.directory
    copy.write_text(corpus.read_text() + "More.\n")
    assert data_mod.prepare(copy, BYTE).directory != d1.directory
    text = corpus.read_text().encode()
    assert np.asarray(d1.train[:200]).astype(np.uint8).tobytes() == text[:200]  # bytes in order, no padding


def test_streams_corpus_larger_than_a_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus_mod, "BLOCK_BYTES", 1000)  # many blocks, as with a corpus larger than RAM
    path = tmp_path / "big.txt"
    lines = [f"line {i} of the corpus" for i in range(2000)]
    path.write_text("\n".join(lines) + "\n")
    blocks = list(corpus_mod.read_blocks(path))
    assert len(blocks) > 40 and "".join(blocks) == path.read_text()
    d = data_mod.prepare(path, BYTE)
    total = len(d.train) + len(d.val)
    assert total == len(path.read_bytes()) + 1  # + end of document
    # the validation split is spread over the corpus, not just its end
    val_text = np.asarray(d.val[d.val < 256]).astype(np.uint8).tobytes().decode()
    assert "line 10" in val_text or "line 2" in val_text
    assert "line 1999" in val_text


def test_batches_are_fixed_shape_and_a_pure_function_of_seed_and_step(corpus: Path):
    d = data_mod.prepare(corpus, BYTE)
    a = data_mod.train_batch(d, seed=3, step=7, batch_size=4, seq_len=32, accum=2)
    b = data_mod.train_batch(d, seed=3, step=7, batch_size=4, seq_len=32, accum=2)
    c = data_mod.train_batch(d, seed=3, step=8, batch_size=4, seq_len=32, accum=2)
    assert a.shape == (2, 4, 33) and a.dtype == np.int32
    assert (a == b).all() and not (a == c).all()
    start = data_mod.batch_offsets(3, 7, len(d.train), 8, 32)[0]
    assert (a[0, 0] == np.asarray(d.train[start : start + 33])).all()
    evals = data_mod.eval_batches(d, batch_size=4, seq_len=32, max_batches=3)
    assert len(evals) == 3 and all(e.shape == (4, 33) for e in evals)


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "is empty"), (b"ok\n\0\0binary", "binary"), (b"caf\xe9 au lait\n", "not valid UTF-8")],
)
def test_bad_corpora_are_explained(tmp_path: Path, content: bytes, needle: str):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(MlxllmError, match=needle):
        data_mod.prepare(path, BYTE)


def test_missing_corpus(tmp_path: Path):
    with pytest.raises(MlxllmError, match="does not exist"):
        corpus_mod.open_corpus(tmp_path / "nope.txt", quiet=True).files
    with pytest.raises(MlxllmError, match="no text files"):
        corpus_mod.open_corpus(tmp_path, quiet=True).files


def test_corpus_shorter_than_a_context_window(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("A short text.\n" * 3)
    d = data_mod.prepare(path, BYTE)
    with pytest.raises(MlxllmError, match="too short"):
        data_mod.check_length(d, 64)


def test_a_folder_skips_binary_files_and_decodes_other_encodings(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "a.txt").write_text("plain UTF-8 text, café\n" * 50)
    (tmp_path / "blob.txt").write_bytes(b"PK\x03\x04\0\0binary" * 20)
    (tmp_path / "latin.txt").write_bytes("café crème, naïve\n".encode("latin-1") * 50)
    d = data_mod.prepare(tmp_path, BYTE, quiet=True)
    warning = capsys.readouterr().err
    assert "blob.txt" in warning and "latin.txt (cp1252)" in warning and "a.txt" not in warning.replace("latin.txt", "")
    text = np.concatenate([np.asarray(d.train), np.asarray(d.val)])
    decoded = bytes(int(t) for t in text if t < 256).decode()
    assert "café crème, naïve" in decoded and "binary" not in decoded  # the Latin-1 file, as text
    assert json.loads((d.directory / "meta.json").read_text())["skipped"] == [str(tmp_path / "blob.txt")]
    several = corpus_mod.open_corpus([tmp_path / "a.txt", str(tmp_path / "*.txt")], quiet=True).files
    assert several == [tmp_path / "a.txt", tmp_path / "latin.txt"]  # each file once, binary left out
    m, t, k = tiny_configs(tmp_path, tmp_path / "run", max_steps=4, eval_interval=4, seq_len=16, eval_batches=1)
    assert train(RunConfig(model=m, tokenizer=k, train=t), show_progress=False).step == 4  # and the folder trains


def test_a_very_long_line_is_cut_between_characters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(corpus_mod, "BLOCK_BYTES", 100)
    path = tmp_path / "one-line.txt"
    path.write_text("日本語のテキスト🎉 " * 200)  # no line break, multi-byte characters
    blocks = list(corpus_mod.read_blocks(path))
    assert len(blocks) > 3 and "".join(blocks) == path.read_text()
