"""A corpus written into the packed token files that data.py memory-maps: text files in blocks, jsonl
records whole (each rendered, tokenized part by part, and ended with EOS), and beside the tokens, where
some tokens do not count as targets (a masked prompt), a mask file of one byte per token.

Each part of a corpus has a role: `split` (the last val_fraction of each text block's tokens, and every
1/val_fraction-th record, go to the validation split: deterministic and spread over the corpus),
`train` or `val` (all of it to that split). The files are written under a temporary name and renamed
into place only when every record was read and written, so nothing trains on a half-read corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlxllm import records
from mlxllm.chat import ChatTemplate, Part
from mlxllm.corpus import Corpus
from mlxllm.tokenizer import Tokenizer

import numpy as np

FORMAT_VERSION = 1  # of the files and meta.json: part of the cache key
SPLITS = ("train", "val")
ROLES = ("split", "train", "val")


class Splits:
    """The token (and mask) files of both splits while they are written, and what they hold."""

    def __init__(self, directory: Path, dtype: type, masked: bool):
        """directory: where the files go; dtype: the token ids' numpy type; masked: write mask files."""
        self.directory, self.dtype, self.masked = directory, dtype, masked
        self.tokens = {s: open(directory / f"{s}.bin", "wb") for s in SPLITS}
        self.masks = {s: open(directory / f"{s}_mask.bin", "wb") for s in SPLITS} if masked else {}
        self.count = dict.fromkeys(SPLITS, 0)
        self.counted = dict.fromkeys(SPLITS, 0)
        self.val_bytes = 0
        self.records = 0  # jsonl records written, in both splits

    def write(self, split: str, ids: Sequence[int], counted_bytes: int, mask: Sequence[int] | None = None) -> None:
        """ids into split; mask: 1 for each id that counts as a target (None: all do); counted_bytes:
        the UTF-8 bytes of the counted ids' text (for bits per byte)."""
        np.asarray(ids, dtype=self.dtype).tofile(self.tokens[split])
        if self.masked:
            np.asarray(np.ones(len(ids)) if mask is None else mask, dtype=np.uint8).tofile(self.masks[split])
        self.count[split] += len(ids)
        self.counted[split] += len(ids) if mask is None else int(np.count_nonzero(mask))
        if split == "val":
            self.val_bytes += counted_bytes

    def close(self) -> bool:
        """Close the files; whether a mask is kept (one that counts every token is dropped)."""
        for f in [*self.tokens.values(), *self.masks.values()]:
            f.close()
        if self.masked and self.counted == self.count:
            for s in SPLITS:
                (self.directory / f"{s}_mask.bin").unlink()
            self.masked = False
        return self.masked


def _lookahead(it: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Yield (item, is_last) pairs."""
    prev = next(it, None)
    while prev is not None:
        cur = next(it, None)
        yield prev, cur is None
        prev = cur


def _write_text(corpus: Corpus, path: Path, tok: Tokenizer, role: str, val_fraction: float, out: Splits) -> None:
    for block, last in _lookahead(corpus.blocks(path)):
        ids = tok.encode(block) + ([tok.eos_id] if last else [])
        cut = {"split": len(ids) - int(len(ids) * val_fraction), "train": len(ids), "val": 0}[role]
        out.write("train", ids[:cut], 0)
        out.write("val", ids[cut:], len(tok.decode(ids[cut:]).encode("utf-8")))


def encode_record(parts: list[Part], tok: Tokenizer) -> tuple[list[int], list[int], int]:
    """A record's ids, ending with EOS, their mask (1: counted), and the UTF-8 bytes of the counted text.
    Each part is tokenized on its own, as a prompt is at generation; the EOS counts where the record's
    last part does (a completion, a last assistant turn), and is not added twice."""
    ids: list[int] = []
    mask: list[int] = []
    counted_bytes = 0
    for p in parts:
        piece = tok.encode(p.text)
        ids += piece
        mask += [int(p.counted)] * len(piece)
        counted_bytes += len(p.text.encode("utf-8")) if p.counted else 0
    if not ids or ids[-1] != tok.eos_id:
        ids.append(tok.eos_id)
        mask.append(int(parts[-1].counted) if parts else 1)
    return ids, mask, counted_bytes


def _write_records(
    corpus: Corpus, path: Path, tok: Tokenizer, template: ChatTemplate, mask: bool, role: str, every: int, out: Splits
) -> None:
    """Each record of a jsonl file into its split: with role `split`, record i of the corpus goes to
    validation when i % every == every - 1."""
    for parts in records.rendered(path, template, mask, corpus.encodings.get(path, "utf-8")):
        ids, ids_mask, counted_bytes = encode_record(parts, tok)
        split = "val" if role == "val" or (role == "split" and out.records % every == every - 1) else "train"
        out.records += 1
        out.write(split, ids, counted_bytes if split == "val" else 0, ids_mask)


def build(
    parts: list[tuple[Corpus, str]],
    tok: Tokenizer,
    template: ChatTemplate,
    val_fraction: float,
    mask_prompt: bool,
    directory: Path,
    quiet: bool,
) -> None:
    """Write the corpus parts (each with its role) into directory: train.bin and val.bin, their
    *_mask.bin where some token does not count, the tokenizer, and meta.json."""
    files = [p for corpus, _ in parts for p in corpus.files]
    if not quiet:
        print(f"Tokenizing {len(files)} file(s) into {directory} ...", file=sys.stderr)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        out = Splits(tmp, dtype, masked=any(records.is_jsonl(p) for p in files))
        every = max(1, round(1 / val_fraction))
        try:
            for corpus, role in parts:
                for path in corpus.files:
                    if records.is_jsonl(path):
                        _write_records(corpus, path, tok, template, mask_prompt, role, every, out)
                    else:
                        _write_text(corpus, path, tok, role, val_fraction, out)
        finally:
            masked = out.close()
        tok.save(tmp)
        meta = {
            "version": FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "train_tokens": out.count["train"],
            "val_tokens": out.count["val"],
            "train_counted": out.counted["train"],
            "val_counted": out.counted["val"],
            "val_bytes": out.val_bytes,
            "masked": masked,
            "records": out.records,
            "template": None if out.records == 0 else template.origin,
            "files": [str(p) for p in files[:1000]],
            "decoded": {str(p): e for corpus, _ in parts for p, e in corpus.encodings.items()},
            "skipped": [str(p) for corpus, _ in parts for p in corpus.skipped],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(directory)
    except OSError:  # another process built the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
