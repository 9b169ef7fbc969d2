"""Tokenizers: sentencepiece BPE with byte fallback, trained on the corpus, and plain bytes for tiny runs."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from mlxllm.config import TokenizerConfig
from mlxllm.device import usable_cores
from mlxllm.errors import MlxllmError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-document token."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))


class SentencePieceTokenizer:
    def __init__(self, proto: bytes):
        self.proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.vocab_size()
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.proto)
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "bpe", "vocab_size": self.vocab_size}))


def train_tokenizer(lines: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train on an iterator of lines (sampled by sentencepiece, so a huge corpus is fine)."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for line in lines if line.strip()),
            model_writer=model,
            model_type="bpe",
            vocab_size=cfg.vocab_size,
            hard_vocab_limit=False,  # a small corpus gets the pieces it supports instead of an error
            byte_fallback=True,
            character_coverage=0.9995,
            # Keep text exactly: code and poetry live in their whitespace.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            unk_id=0,
            eos_id=1,
            bos_id=-1,
            pad_id=-1,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=usable_cores(),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise MlxllmError(
            f"Could not train a BPE tokenizer of {cfg.vocab_size} pieces on this corpus ({e}). "
            "Use a smaller --set tokenizer.vocab_size, or --set tokenizer.kind=byte for a tiny corpus."
        ) from None
    return SentencePieceTokenizer(model.getvalue())


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    meta_path = directory / "tokenizer.json"
    if not meta_path.exists():
        raise MlxllmError(f"No tokenizer in {directory} (tokenizer.json is missing). Is this an mlxllm run directory?")
    kind = json.loads(meta_path.read_text()).get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
    raise MlxllmError(f"Unknown tokenizer kind {kind!r} in {meta_path}.")
