"""A corpus as memory-mapped token files, and fixed-shape packed batches drawn from them.

The corpus is read in blocks (see corpus.py), so it never has to fit in memory; jsonl records are
rendered and written whole, with a mask of the tokens that count as targets (packing.py). The last
`val_fraction` of each block's tokens (and every 1/val_fraction-th record) goes to the validation
split: deterministic, spread over the whole corpus, and computed while streaming; or a corpus of its
own is the validation split (train.val_data). Token files are cached by the corpus' content hash and
the tokenizer settings, so a second run (or a search trial) reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlxllm import packing, records
from mlxllm.chat import ChatTemplate, template_for
from mlxllm.config import TokenizerConfig
from mlxllm.corpus import Corpus, Spec, fingerprint, open_corpus
from mlxllm.device import cache_dir
from mlxllm.errors import MlxllmError
from mlxllm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

import numpy as np

FORMAT_VERSION = packing.FORMAT_VERSION


@dataclass
class TokenData:
    """Train and validation tokens, memory-mapped, with the tokenizer that made them; for a corpus with
    masked prompts, a mask beside each split (1 where the token counts as a target; None: all count)."""

    train: np.ndarray
    val: np.ndarray
    val_bytes: int  # the UTF-8 bytes of the counted validation tokens
    tokenizer: Tokenizer
    directory: Path
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None
    train_counted: int | None = None  # tokens that count as targets (None: all of them)
    val_counted: int | None = None

    @property
    def bytes_per_token(self) -> float:
        counted = len(self.val) if self.val_counted is None else self.val_counted
        return self.val_bytes / max(1, counted)


def prepare(
    spec: Spec,
    tok_cfg: TokenizerConfig,
    *,
    val_fraction: float = 0.1,
    quiet: bool = True,
    tokenizer: Tokenizer | None = None,
    val_spec: Spec = None,
    mask_prompt: bool = True,
) -> TokenData:
    """Tokenize the corpus once and memory-map the result: with `tokenizer` (a pretrained model's), or
    with a tokenizer trained on the corpus first as tok_cfg says. val_spec: a corpus that is the whole
    validation split (the corpus then trains whole; None: val_fraction of it validates). mask_prompt:
    the prompts of jsonl prompt/completion and messages records do not count as targets."""
    if not 0.0 < val_fraction < 0.5:
        raise MlxllmError(f"val_fraction must be between 0 and 0.5 (got {val_fraction}).")
    parts = [(open_corpus(spec), "split" if val_spec is None else "train")]
    if val_spec is not None:
        parts.append((open_corpus(val_spec), "val"))
    return _prepared(parts, tok_cfg, tokenizer, val_fraction, mask_prompt, quiet)


def prepare_eval(spec: Spec, tokenizer: Tokenizer, *, mask_prompt: bool = True, quiet: bool = True) -> TokenData:
    """The whole corpus as the validation split (the training split empty), tokenized by `tokenizer`
    and rendered, for jsonl records, as training renders them."""
    return _prepared([(open_corpus(spec), "val")], None, tokenizer, 0.1, mask_prompt, quiet)


def _key(parts: list[tuple[Corpus, str]], named: list, val_fraction: float, mask: bool, template: ChatTemplate) -> str:
    """The cache key: the corpus content and the tokenizer; for jsonl files, a separate validation
    corpus or an evaluation, also which files are records, each part's role, masking and the template."""
    prints = [fingerprint(corpus.files) for corpus, _ in parts]
    key: list = [FORMAT_VERSION, prints[0], *named, val_fraction]
    if len(parts) > 1 or parts[0][1] != "split" or any(records.is_jsonl(p) for c, _ in parts for p in c.files):
        roles = [[role, fp, [records.is_jsonl(p) for p in c.files]] for (c, role), fp in zip(parts, prints)]
        key.append({"parts": roles, "mask_prompt": mask, "template": template.fingerprint()})
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _prepared(
    parts: list[tuple[Corpus, str]],
    tok_cfg: TokenizerConfig | None,
    tokenizer: Tokenizer | None,
    val_fraction: float,
    mask_prompt: bool,
    quiet: bool,
) -> TokenData:
    """The token data of the corpus parts, from the cache or built: every jsonl record is checked
    before a tokenizer is trained or a file written."""
    named = [tokenizer.fingerprint()] if tokenizer is not None else [tok_cfg.kind, tok_cfg.vocab_size]
    template = template_for(tokenizer)
    directory = cache_dir() / "data" / _key(parts, named, val_fraction, mask_prompt, template)
    if not (directory / "meta.json").exists():
        for corpus, _ in parts:
            check_records(corpus)
        tok = tokenizer or train_tokenizer(corpus_lines(parts[0][0], template), tok_cfg)
        packing.build(parts, tok, template, val_fraction, mask_prompt, directory, quiet)
    return open_prepared(directory)


def check_records(corpus: Corpus) -> None:
    """Read every record of the corpus' jsonl files: a malformed line is refused, with its number."""
    for path in corpus.files:
        if records.is_jsonl(path):
            records.check(path, corpus.encodings.get(path, "utf-8"))


def corpus_lines(corpus: Corpus, template: ChatTemplate | None = None) -> Iterator[str]:
    """Every line of the corpus, for training a tokenizer on it: a jsonl record's lines as the model
    will read them (rendered by template, mlxllm's plain one by default), not its JSON."""
    template = template or template_for(None)
    for path in corpus.files:
        if records.is_jsonl(path):
            for text in records.texts(path, template, corpus.encodings.get(path, "utf-8")):
                yield from text.split("\n")
        else:
            for block in corpus.blocks(path):
                yield from block.split("\n")


def open_prepared(directory: Path) -> TokenData:
    """The token data `prepare` built in directory, memory-mapped again (nothing is re-read or hashed)."""
    meta = json.loads((directory / "meta.json").read_text())

    def mmap(name: str, n: int, dtype: str) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(directory / name, dtype=dtype, mode="r", shape=(n,))

    masked = meta.get("masked", False)
    n_train, n_val = meta["train_tokens"], meta["val_tokens"]
    return TokenData(
        train=mmap("train.bin", n_train, meta["dtype"]),
        val=mmap("val.bin", n_val, meta["dtype"]),
        val_bytes=meta["val_bytes"],
        tokenizer=load_tokenizer(directory),
        directory=directory,
        train_mask=mmap("train_mask.bin", n_train, "uint8") if masked else None,
        val_mask=mmap("val_mask.bin", n_val, "uint8") if masked else None,
        train_counted=meta.get("train_counted", n_train),
        val_counted=meta.get("val_counted", n_val),
    )


def check_length(data: TokenData, seq_len: int) -> None:
    need = seq_len + 1
    for name, split in (("training", data.train), ("validation", data.val)):
        if len(split) < need:
            raise MlxllmError(
                f"The corpus is too short: its {name} split has {len(split)} tokens but one context window "
                f"needs {need}. Add more text, train with a shorter context (--set train.seq_len=N), or name "
                "a validation corpus of its own (--val-data)."
            )
    if data.train_mask is not None and data.train_counted == 0:
        raise MlxllmError(
            "No token of the training split counts as a target: its records have no completion or assistant "
            "turn to learn. Add some, or train on every token with --set train.mask_prompt=false."
        )


def batch_offsets(seed: int, step: int, n_tokens: int, count: int, seq_len: int) -> np.ndarray:
    """Window starts for one step: a pure function of (seed, step), so resuming needs only the step."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len, size=count)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Packed windows of seq_len + 1 tokens (inputs and shifted targets), no padding: (n, seq_len + 1)
    int32; with the split's mask, (n, 2, seq_len + 1), the tokens and beside them 1 where a token counts."""
    idx = offsets[:, None] + np.arange(seq_len + 1)[None]
    tokens = np.asarray(tokens[idx], dtype=np.int32)
    return tokens if mask is None else np.stack([tokens, np.asarray(mask[idx], dtype=np.int32)], axis=1)


def train_batch(data: TokenData, seed: int, step: int, batch_size: int, seq_len: int, accum: int = 1) -> np.ndarray:
    """(accum, batch_size, seq_len + 1) int32 tokens for optimizer step `step` ((accum, batch_size, 2,
    seq_len + 1) with their mask, for a masked corpus)."""
    offsets = batch_offsets(seed, step, len(data.train), accum * batch_size, seq_len)
    rows = get_batch(data.train, offsets, seq_len, data.train_mask)
    return rows.reshape(accum, batch_size, *rows.shape[1:])


def counted_targets(batch: np.ndarray) -> int:
    """How many of a batch's targets count: all of them, or those its mask marks."""
    return int(batch[..., 1:].size if batch.ndim == 2 else np.count_nonzero(batch[:, 1, 1:]))


def windows(data: TokenData, batch_size: int, seq_len: int, n_windows: int) -> list[np.ndarray]:
    """The first n_windows non-overlapping validation windows, in batches of batch_size (the last may
    be shorter)."""
    offsets = np.arange(n_windows) * seq_len
    return [
        get_batch(data.val, offsets[i : i + batch_size], seq_len, data.val_mask)
        for i in range(0, n_windows, batch_size)
    ]


def eval_batches(data: TokenData, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Non-overlapping validation windows from the start of the split, the same at every evaluation."""
    n_windows = min((len(data.val) - 1) // seq_len, max_batches * batch_size)
    if n_windows >= batch_size:
        n_windows -= n_windows % batch_size  # full batches only: one compiled shape
    batches = windows(data, batch_size, seq_len, n_windows)
    if data.val_mask is not None and sum(counted_targets(b) for b in batches) == 0:
        raise MlxllmError(
            f"The validation windows (the first {n_windows} of {seq_len} tokens) hold no completion or assistant "
            "token to measure. Give validation more records (train.val_fraction, or a corpus of its own with "
            "--val-data), or measure every token with --set train.mask_prompt=false."
        )
    return batches
