"""Tokenizers: sentencepiece BPE with byte fallback, trained on the corpus, and plain bytes for tiny runs."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from mlxllm.chat import read_settings
from mlxllm.config import TokenizerConfig
from mlxllm.device import usable_cores
from mlxllm.errors import MlxllmError

import sentencepiece as spm


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def save(self, directory: Path) -> None: ...
    def fingerprint(self) -> str: ...  # names the tokenizer in the token cache's key


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

    def fingerprint(self) -> str:
        return "byte"


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

    def fingerprint(self) -> str:
        return "sentencepiece:" + hashlib.sha256(self.proto).hexdigest()


class HFTokenizer:
    """An imported model's own Hugging Face tokenizer.json, through the tokenizers library, with its
    chat template (chat.read_settings) where it came with one."""

    def __init__(self, text: str, eos_id: int, chat: dict[str, str] | None = None):
        """text: the tokenizer.json; eos_id: its end-of-sequence id; chat: its chat_template and the
        special tokens the template names ({} or None: no template)."""
        from tokenizers import Tokenizer as HFT

        self.text = text
        self.tk = HFT.from_str(text)
        self.vocab_size = self.tk.get_vocab_size()
        self.eos_id = eos_id
        self.chat = dict(chat or {})

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(self.text)
        config: dict = {"eos_token": self.tk.id_to_token(self.eos_id)}
        if self.chat:  # the template's own special tokens apart: its eos_token need not be eos_id's
            tokens = {k: v for k, v in self.chat.items() if k != "chat_template"}
            config.update(chat_template=self.chat["chat_template"], mlxllm_chat_tokens=tokens)
        (directory / "tokenizer_config.json").write_text(json.dumps(config))

    def fingerprint(self) -> str:
        own = "tokenizers:" + hashlib.sha256(self.text.encode()).hexdigest()
        if not self.chat:  # as before templates were read: the caches of such runs stay theirs
            return own
        return own + ":chat:" + hashlib.sha256(json.dumps(self.chat, sort_keys=True).encode()).hexdigest()


# sentencepiece drops every training "sentence" longer than its max_sentence_length (4,192 bytes by
# default), which leaves nothing to learn from in minified text, JSON lines or CJK prose without
# line breaks. Longer lines are cut into pieces of at most SENTENCE_CHARS characters (at a space
# where there is one), each at most 4 bytes a character within MAX_SENTENCE_BYTES.
SENTENCE_CHARS = 2048
MAX_SENTENCE_BYTES = 4 * SENTENCE_CHARS


def training_sentences(line: str) -> Iterator[str]:
    """line in pieces sentencepiece trains on: no longer than SENTENCE_CHARS characters."""
    while len(line) > SENTENCE_CHARS:
        cut = line.rfind(" ", SENTENCE_CHARS // 2, SENTENCE_CHARS)
        cut = cut if cut > 0 else SENTENCE_CHARS
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def train_tokenizer(lines: Iterator[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train on an iterator of lines (sampled by sentencepiece, so a huge corpus is fine)."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(piece for line in lines if line.strip() for piece in training_sentences(line)),
            max_sentence_length=MAX_SENTENCE_BYTES,
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


def _hf_eos(directory: Path, text: str) -> int:
    """The end-of-sequence id of a Hugging Face tokenizer: from config.json, else tokenizer_config.json."""

    def read(name: str) -> dict:
        try:
            return json.loads((directory / name).read_text())
        except (OSError, ValueError):
            return {}

    eos = read("config.json").get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int):
        return eos
    token = read("tokenizer_config.json").get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token
    from tokenizers import Tokenizer as HFT

    eos = HFT.from_str(text).token_to_id(token) if isinstance(token, str) else None
    if eos is None:
        raise MlxllmError(
            f"The tokenizer in {directory} names no end-of-sequence token (eos_token_id in config.json or eos_token in "
            "tokenizer_config.json), which training and generation need. Add one and try again."
        )
    return eos


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in directory: mlxllm's own, or a Hugging Face tokenizer.json."""
    directory = Path(directory)
    meta_path = directory / "tokenizer.json"
    if not meta_path.exists():
        if (directory / "tokenizer.model").exists():  # a sentencepiece model on its own
            return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
        raise MlxllmError(f"No tokenizer in {directory} (tokenizer.json is missing). Is this an mlxllm run directory?")
    text = meta_path.read_text()
    try:
        meta = json.loads(text)
    except ValueError:
        raise MlxllmError(
            f"{meta_path} is not valid JSON. Restore the tokenizer files from the model's source."
        ) from None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return SentencePieceTokenizer((directory / "tokenizer.model").read_bytes())
    if isinstance(meta, dict) and "model" in meta:  # Hugging Face's format
        return HFTokenizer(text, _hf_eos(directory, text), read_settings(directory))
    raise MlxllmError(f"Unknown tokenizer kind {kind!r} in {meta_path}.")
