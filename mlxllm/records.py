"""jsonl corpora: one JSON record a line, in mlx-lm's three formats, checked line by line and rendered
into the parts of text a model trains on.

    {"text": "..."}                                       trained on whole, like a text file
    {"prompt": "...", "completion": "..."}                the loss on the completion only (mask_prompt)
    {"messages": [{"role": "...", "content": "..."}, ...]}  the loss on the assistant turns only (mask_prompt)

A prompt/completion record is the conversation [user: prompt, assistant: completion] when the model's
tokenizer has a chat template (as mlx-lm renders it), else the prompt and the completion joined as
they are. A messages record is rendered by the tokenizer's chat template, else mlxllm's plain one
(chat.PLAIN_TEMPLATE). A record may carry "tools" (a list), handed to the template. Blank lines are
skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlxllm.chat import ChatTemplate, Part
from mlxllm.errors import MlxllmError

SUFFIX = ".jsonl"
FORMATS = (
    'each line one JSON object in one of mlx-lm\'s formats: {"text": ...}, {"prompt": ..., "completion": ...} '
    'or {"messages": [{"role": ..., "content": ...}, ...]}'
)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == SUFFIX


def _malformed(path: Path, line: int, problem: str) -> MlxllmError:
    return MlxllmError(
        f"{path}, line {line}: {problem}. A .jsonl corpus holds {FORMATS}. Fix or remove that line and run "
        "again; nothing was trained or written."
    )


def _kind(record: Any) -> tuple[str | None, str]:
    """The record's format (text, completion, messages), or None and what is wrong with it."""
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    if "tools" in record and not isinstance(record["tools"], list):
        return None, '"tools" is not a list'
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, '"messages" is not a non-empty list'
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return None, f'message {i} is not an object with a string "role" and a string "content"'
        return "messages", ""
    if "prompt" in record or "completion" in record:
        bad = [k for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
        return ("completion", "") if not bad else (None, f'"{bad[0]}" is missing or not a string')
    if "text" in record:
        return ("text", "") if isinstance(record["text"], str) else (None, '"text" is not a string')
    return None, f"no text, prompt/completion or messages key (keys: {', '.join(map(repr, record)) or 'none'})"


def read(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, kind, record) for every record of a jsonl file; the first malformed line is
    refused with its file and number."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise _malformed(path, n, f"not valid UTF-8 (byte {e.start} of the line)") from None
            if n == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not part of the record
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise _malformed(path, n, f"not valid JSON ({e})") from None
            kind, problem = _kind(record)
            if kind is None:
                raise _malformed(path, n, problem)
            yield n, kind, record


def check(path: Path, encoding: str = "utf-8") -> int:
    """Read every line of a jsonl file before anything is built from it; the number of records."""
    count = sum(1 for _ in read(path, encoding))
    if count == 0:
        raise MlxllmError(f"{path} holds no records (every line is blank). A .jsonl corpus holds {FORMATS}.")
    return count


def parts(kind: str, record: dict[str, Any], template: ChatTemplate, mask: bool) -> list[Part]:
    """The record's rendered text in parts, counted or not (mask False: all counted)."""
    if kind == "text":
        return [Part(record["text"], True)]
    tools = record.get("tools")
    if kind == "completion":
        if template.plain:
            return [Part(record["prompt"], not mask), Part(record["completion"], True)]
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        return template.parts(messages, tools=tools, mask=mask)
    return template.parts(record["messages"], tools=tools, mask=mask)


def rendered(path: Path, template: ChatTemplate, mask: bool, encoding: str = "utf-8") -> Iterator[list[Part]]:
    """Every record of a jsonl file in parts; an error of the template names the record's line."""
    for n, kind, record in read(path, encoding):
        try:
            yield parts(kind, record, template, mask)
        except MlxllmError as e:
            raise MlxllmError(f"{path}, line {n}: {e}") from None


def texts(path: Path, template: ChatTemplate, encoding: str = "utf-8") -> Iterator[str]:
    """The rendered text of every record, for training a tokenizer on what the model will read."""
    for record in rendered(path, template, False, encoding):
        yield "".join(p.text for p in record)
