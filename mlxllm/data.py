"""A corpus as memory-mapped token files, and fixed-shape packed batches drawn from them.

The corpus is read in blocks (see corpus.py), so it never has to fit in memory. The last
`val_fraction` of each block's tokens goes to the validation split: deterministic, spread over
the whole corpus, and computed while streaming. Token files are cached by the corpus' content
hash and the tokenizer settings, so a second run (or a search trial) reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlxllm.config import TokenizerConfig
from mlxllm.corpus import Corpus, Spec, fingerprint, open_corpus
from mlxllm.device import cache_dir
from mlxllm.errors import MlxllmError
from mlxllm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

import numpy as np

FORMAT_VERSION = 1


@dataclass
class TokenData:
    """Train and validation tokens, memory-mapped, with the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    val_bytes: int
    tokenizer: Tokenizer
    directory: Path

    @property
    def bytes_per_token(self) -> float:
        return self.val_bytes / max(1, len(self.val))


def prepare(
    spec: Spec,
    tok_cfg: TokenizerConfig,
    *,
    val_fraction: float = 0.1,
    quiet: bool = True,
    tokenizer: Tokenizer | None = None,
) -> TokenData:
    """Tokenize the corpus once and memory-map the result: with `tokenizer` (a pretrained model's), or
    with a tokenizer trained on the corpus first as tok_cfg says."""
    if not 0.0 < val_fraction < 0.5:
        raise MlxllmError(f"val_fraction must be between 0 and 0.5 (got {val_fraction}).")
    corpus = open_corpus(spec)
    named = [tokenizer.fingerprint()] if tokenizer is not None else [tok_cfg.kind, tok_cfg.vocab_size]
    key = json.dumps([FORMAT_VERSION, fingerprint(corpus.files), *named, val_fraction])
    directory = cache_dir() / "data" / hashlib.sha256(key.encode()).hexdigest()[:20]
    if not (directory / "meta.json").exists():
        _build(corpus, tokenizer or train_tokenizer(corpus_lines(corpus), tok_cfg), val_fraction, directory, quiet)
    return open_prepared(directory)


def corpus_lines(corpus: Corpus) -> Iterator[str]:
    """Every line of the corpus, for training a tokenizer on it."""
    for path in corpus.files:
        for block in corpus.blocks(path):
            yield from block.split("\n")


def _build(corpus: Corpus, tok: Tokenizer, val_fraction: float, directory: Path, quiet: bool) -> None:
    files = corpus.files
    if not quiet:
        print(f"Tokenizing {len(files)} file(s) into {directory} ...", file=sys.stderr)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    val_bytes = n_train = n_val = 0
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        for path in files:
            blocks = list_lookahead(corpus.blocks(path))
            for block, last in blocks:
                ids = tok.encode(block) + ([tok.eos_id] if last else [])
                n = int(len(ids) * val_fraction)
                split = len(ids) - n
                np.asarray(ids[:split], dtype=dtype).tofile(ftrain)
                np.asarray(ids[split:], dtype=dtype).tofile(fval)
                val_bytes += len(tok.decode(ids[split:]).encode("utf-8"))
                n_train, n_val = n_train + split, n_val + n
    tok.save(tmp)
    meta = {
        "version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "val_bytes": val_bytes,
        "files": [str(p) for p in files[:1000]],
        "decoded": {str(p): e for p, e in corpus.encodings.items()},
        "skipped": [str(p) for p in corpus.skipped],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(directory)
    except OSError:  # another process built the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)


def list_lookahead(it: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Yield (item, is_last) pairs."""
    prev = next(it, None)
    while prev is not None:
        cur = next(it, None)
        yield prev, cur is None
        prev = cur


def open_prepared(directory: Path) -> TokenData:
    """The token data `prepare` built in directory, memory-mapped again (nothing is re-read or hashed)."""
    meta = json.loads((directory / "meta.json").read_text())

    def mmap(name: str, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=meta["dtype"])
        return np.memmap(directory / name, dtype=meta["dtype"], mode="r", shape=(n,))

    return TokenData(
        train=mmap("train.bin", meta["train_tokens"]),
        val=mmap("val.bin", meta["val_tokens"]),
        val_bytes=meta["val_bytes"],
        tokenizer=load_tokenizer(directory),
        directory=directory,
    )


def check_length(data: TokenData, seq_len: int) -> None:
    need = seq_len + 1
    for name, split in (("training", data.train), ("validation", data.val)):
        if len(split) < need:
            raise MlxllmError(
                f"The corpus is too short: its {name} split has {len(split)} tokens but one context window "
                f"needs {need}. Add more text, or train with a shorter context (--set train.seq_len=N)."
            )


def batch_offsets(seed: int, step: int, n_tokens: int, count: int, seq_len: int) -> np.ndarray:
    """Window starts for one step: a pure function of (seed, step), so resuming needs only the step."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=count)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> np.ndarray:
    """Packed windows of seq_len + 1 tokens (inputs and shifted targets), no padding."""
    idx = offsets[:, None] + np.arange(seq_len + 1)[None]
    return np.asarray(tokens[idx], dtype=np.int32)


def train_batch(data: TokenData, seed: int, step: int, batch_size: int, seq_len: int, accum: int = 1) -> np.ndarray:
    """(accum, batch_size, seq_len + 1) int32 tokens for optimizer step `step`."""
    offsets = batch_offsets(seed, step, len(data.train), accum * batch_size, seq_len)
    return get_batch(data.train, offsets, seq_len).reshape(accum, batch_size, seq_len + 1)


def eval_batches(data: TokenData, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Non-overlapping validation windows from the start of the split, the same at every evaluation."""
    n_windows = min((len(data.val) - 1) // seq_len, max_batches * batch_size)
    if n_windows >= batch_size:
        n_windows -= n_windows % batch_size  # full batches only: one compiled shape
    offsets = np.arange(n_windows) * seq_len
    return [get_batch(data.val, offsets[i : i + batch_size], seq_len) for i in range(0, n_windows, batch_size)]
