"""Corpus to memory-mapped token files, and fixed-shape packed batches drawn from them.

The corpus is read in blocks of about 1 MiB, so it never has to fit in memory. The last
`val_fraction` of each block's tokens goes to the validation split: deterministic, spread over
the whole corpus, and computed while streaming. Token files are cached by the corpus' content
hash and the tokenizer settings, so a second run (or a search trial) reuses them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxllm.config import TokenizerConfig
from mlxllm.device import cache_dir
from mlxllm.errors import MlxllmError
from mlxllm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 20
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".markdown")
DEFAULT_CORPUS_BYTES = 2_500_000


def default_corpus() -> list[Path]:
    """Python's own standard library sources: always there, no network needed."""
    stdlib = Path(os.__file__).parent
    files, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        files.append(path)
        total += path.stat().st_size
        if total >= DEFAULT_CORPUS_BYTES:
            break
    return files


def resolve_corpus(spec: str | Path | None) -> list[Path]:
    """A file, a folder (its text files, recursively) or a glob; None means the default corpus."""
    if spec is None:
        return default_corpus()
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise MlxllmError(
                f"The folder {spec} holds no text files ({', '.join(TEXT_SUFFIXES)}). "
                "Point --data at a text file, a folder of .txt/.md files, or a glob such as 'notes/**/*.txt'."
            )
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise MlxllmError(f"The pattern {spec} matches no files. Check the pattern, or quote it so the shell keeps it.")
    else:
        raise MlxllmError(
            f"The corpus {spec} does not exist. Point --data at a text file, a folder of .txt/.md files, "
            "or a glob; leave it out to train on the built-in corpus."
        )
    if sum(p.stat().st_size for p in files) == 0:
        raise MlxllmError(f"The corpus {spec} is empty. Give it some text to learn from.")
    return files


def read_blocks(path: Path) -> Iterator[str]:
    """UTF-8 text of one file in ~1 MiB pieces cut at line ends; binary or invalid files are refused."""
    with open(path, "rb") as f:
        offset, rest = 0, b""
        while True:
            chunk = f.read(BLOCK_BYTES)
            data = rest + chunk
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if cut == 0:
                cut = len(data) if len(data) >= 4 * BLOCK_BYTES else 0  # a very long line: cut anyway
            if cut == 0:
                rest = data
                continue
            block, rest = data[:cut], data[cut:]
            if b"\0" in block:
                raise MlxllmError(
                    f"{path} looks like a binary file (it contains NUL bytes). "
                    "Train on text files only: remove it from the corpus or narrow --data with a glob such as '*.txt'."
                )
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MlxllmError(
                    f"{path} is not valid UTF-8 (byte {offset + e.start}). Convert it first, for example "
                    f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`, or leave it out of the corpus."
                ) from None
            offset += cut
            yield text


def fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(b"\0file\0")
        with open(path, "rb") as f:
            while chunk := f.read(BLOCK_BYTES):
                h.update(chunk)
    return h.hexdigest()


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
    spec: str | Path | None, tok_cfg: TokenizerConfig, *, val_fraction: float = 0.1, quiet: bool = True
) -> TokenData:
    """Tokenize the corpus once (training its tokenizer first) and memory-map the result."""
    if not 0.0 < val_fraction < 0.5:
        raise MlxllmError(f"val_fraction must be between 0 and 0.5 (got {val_fraction}).")
    files = resolve_corpus(spec)
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, fingerprint(files), tok_cfg.kind, tok_cfg.vocab_size, val_fraction]).encode()
    ).hexdigest()[:20]
    directory = cache_dir() / "data" / key
    if not (directory / "meta.json").exists():
        _build(files, tok_cfg, val_fraction, directory, quiet)
    return open_prepared(directory)


def _build(files: list[Path], tok_cfg: TokenizerConfig, val_fraction: float, directory: Path, quiet: bool) -> None:
    def lines() -> Iterator[str]:
        for path in files:
            for block in read_blocks(path):
                yield from block.split("\n")

    if not quiet:
        print(f"Tokenizing {len(files)} file(s) into {directory} ...", file=sys.stderr)
    tok = train_tokenizer(lines(), tok_cfg)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    val_bytes = n_train = n_val = 0
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
        for path in files:
            blocks = list_lookahead(read_blocks(path))
            for block, last in blocks:
                ids = tok.encode(block) + ([tok.eos_id] if last else [])
                n = int(len(ids) * val_fraction)
                split = len(ids) - n
                np.asarray(ids[:split], dtype=dtype).tofile(ftrain)
                np.asarray(ids[split:], dtype=dtype).tofile(fval)
                val_bytes += len(tok.decode(ids[split:]).encode("utf-8"))
                n_train, n_val = n_train + split, n_val + n
    tok.save(tmp)
    meta = {"version": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "train_tokens": n_train,
            "val_tokens": n_val, "val_bytes": val_bytes, "files": [str(p) for p in files[:1000]]}
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
