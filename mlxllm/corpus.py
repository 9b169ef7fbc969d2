"""What a corpus is and how its files are read: one or more files, folders or globs (or the built-in
corpus), each file read as text in blocks of about 1 MiB cut at line ends, so it never has to fit
in memory; a .jsonl file is read by its records instead (mlxllm.records).

A file named on its own must be UTF-8 text. In a folder or a glob, as in `git grep`, binary files
are skipped and text in another encoding is decoded (as Windows-1252, else Latin-1); both are listed
in a warning, never silently.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlxllm.errors import MlxllmError

BLOCK_BYTES = 1 << 20
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".markdown")
FOLDER_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")  # .jsonl: records (mlxllm.records), read by their lines
DEFAULT_CORPUS_BYTES = 2_500_000
FALLBACK_ENCODINGS = ("cp1252", "latin-1")  # latin-1 decodes any bytes: the last resort

Spec = str | Path | Sequence[str | Path] | None


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


def _expand(spec: str) -> tuple[list[Path], bool]:
    """The files one spec names, and whether it named a single file."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path], True
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES)
        if not files:
            raise MlxllmError(
                f"The folder {spec} holds no text files ({', '.join(FOLDER_SUFFIXES)}). "
                "Point --data at a text or .jsonl file, a folder of .txt/.md/.jsonl files, or a glob such as "
                "'notes/**/*.txt'."
            )
        return files, False
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise MlxllmError(
                f"The pattern {spec} matches no files. Check the pattern, or quote it so the shell keeps it."
            )
        return files, False
    raise MlxllmError(
        f"The corpus {spec} does not exist. Point --data at a text file, a folder of .txt/.md files, "
        "or a glob; leave it out to train on the built-in corpus."
    )


def _sniff(path: Path) -> str | None:
    """The encoding of a file found in a folder: utf-8, or a fallback; None for a binary file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    utf8 = True
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK_BYTES):
            if b"\0" in chunk:
                return None
            if utf8:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8 = False
    if utf8:
        try:
            decoder.decode(b"", final=True)
            return "utf-8"
        except UnicodeDecodeError:
            pass
    data = path.read_bytes()
    for enc in FALLBACK_ENCODINGS:
        try:
            data.decode(enc)
            return enc
        except UnicodeDecodeError:
            continue
    return FALLBACK_ENCODINGS[-1]  # pragma: no cover - latin-1 decodes every byte


@dataclass
class Corpus:
    files: list[Path]
    encodings: dict[Path, str] = field(default_factory=dict)  # files not read as UTF-8
    skipped: list[Path] = field(default_factory=list)  # binary files left out

    def blocks(self, path: Path) -> Iterator[str]:
        return read_blocks(path, self.encodings.get(path, "utf-8"))

    def warning(self) -> str | None:
        parts = []
        if self.skipped:
            parts.append("skipped binary file(s): " + ", ".join(map(str, self.skipped)))
        if self.encodings:
            parts.append("not UTF-8, decoded as: " + ", ".join(f"{p} ({e})" for p, e in self.encodings.items()))
        return "Warning: the corpus " + "; ".join(parts) + "." if parts else None


def open_corpus(spec: Spec, *, quiet: bool = False) -> Corpus:
    """The corpus spec names, with binary and non-UTF-8 files of its folders and globs sorted out
    (and said on stderr unless quiet)."""
    if spec is None:
        return Corpus(default_corpus())
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise MlxllmError("--data names no corpus. Give a text file, a folder or a glob, or leave it out.")
    corpus = Corpus([])
    for one in specs:
        files, single = _expand(str(one))
        for path in files:
            if path in corpus.files:
                continue
            enc = "utf-8" if single else _sniff(path)  # a file named alone is refused at reading if not UTF-8
            if enc is None:
                corpus.skipped.append(path)
                continue
            corpus.files.append(path)
            if enc != "utf-8":
                corpus.encodings[path] = enc
    if not corpus.files:
        raise MlxllmError(f"The corpus {spec} holds only binary files. Point --data at text.")
    if sum(p.stat().st_size for p in corpus.files) == 0:
        raise MlxllmError(f"The corpus {spec} is empty. Give it some text to learn from.")
    if not quiet and corpus.warning():
        print(corpus.warning(), file=sys.stderr)
    return corpus


def read_blocks(path: Path, encoding: str = "utf-8") -> Iterator[str]:
    """The text of one file in ~1 MiB pieces cut at line ends; binary or invalid UTF-8 files are refused."""
    with open(path, "rb") as f:
        offset, rest = 0, b""
        while True:
            chunk = f.read(BLOCK_BYTES)
            data = rest + chunk
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            if cut == 0 and len(data) >= 4 * BLOCK_BYTES:  # a very long line: cut anyway, between characters
                cut = len(data)
                while encoding == "utf-8" and cut > len(data) - 4 and data[cut - 1] & 0xC0 == 0x80:
                    cut -= 1
                if encoding == "utf-8" and data[cut - 1] >= 0xC0:
                    cut -= 1  # the lead byte of a character whose continuation comes in the next chunk
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
                text = block.decode(encoding)
            except UnicodeDecodeError as e:
                raise MlxllmError(
                    f"{path} is not valid UTF-8 (byte {offset + e.start}). Convert it first, for example "
                    f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`, put it in a folder (whose files may be in "
                    "other encodings), or leave it out of the corpus."
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
