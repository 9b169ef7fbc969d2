"""Run configs: TOML files with [model], [tokenizer] and [train] tables, overridable key by key."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mlxllm.errors import MlxllmError
from mlxllm.model import ModelConfig
from mlxllm.tokenizer import TokenizerConfig

SECTIONS = ("model", "tokenizer", "train")


def _train_cls() -> type:
    from mlxllm.train import TrainConfig  # train imports this module

    return TrainConfig


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    tokenizer: TokenizerConfig
    train: Any  # TrainConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise MlxllmError(f"Unknown config table(s) [{'], ['.join(unknown)}]. Valid tables: [model], [tokenizer], [train].")
        try:
            tok = TokenizerConfig(**d.get("tokenizer", {}))
        except TypeError:
            valid = ", ".join(f.name for f in fields(TokenizerConfig))
            bad = ", ".join(sorted(set(d["tokenizer"]) - {f.name for f in fields(TokenizerConfig)}))
            raise MlxllmError(f"Unknown tokenizer config key(s) {bad}. Valid keys: {valid}.") from None
        return cls(
            model=ModelConfig.from_dict(d.get("model", {})), tokenizer=tok, train=_train_cls().from_dict(d.get("train", {}))
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as a path


def apply_overrides(d: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Apply `section.key=value` (or `key=value` when the key is unique) overrides."""
    owners: dict[str, list[str]] = {}
    for section, cls in (("model", ModelConfig), ("tokenizer", TokenizerConfig), ("train", _train_cls())):
        for f in fields(cls):
            owners.setdefault(f.name, []).append(section)
    out = {s: dict(v) for s, v in d.items()}
    for s in SECTIONS:
        out.setdefault(s, {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise MlxllmError(f"Override {item!r} is not of the form key=value (for example train.learning_rate=3e-4).")
        key = key.strip()
        section, _, name = key.rpartition(".")
        if not section:
            sections = owners.get(name, [])
            if len(sections) != 1:
                where = "; ".join(f"{s}: {', '.join(sorted(k for k, o in owners.items() if s in o))}" for s in SECTIONS)
                raise MlxllmError(
                    f"Unknown config key {name!r}" if not sections else f"Ambiguous config key {name!r}"
                    + f". Use section.key; valid keys are {where}."
                )
            section = sections[0]
        if section not in SECTIONS or section not in owners.get(name, []):
            valid = ", ".join(sorted(k for k, o in owners.items() if section in o)) if section in SECTIONS else ""
            raise MlxllmError(
                f"Unknown config key {key!r}. "
                + (f"Valid [{section}] keys: {valid}." if valid else "Tables are model, tokenizer and train.")
            )
        out[section][name] = None if value.strip().lower() == "none" else _parse_value(value.strip())
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults) and apply overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MlxllmError(f"Config file {path} does not exist. The configs/ folder has examples (tiny.toml, shakespeare.toml, small.toml).")
        try:
            d = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise MlxllmError(f"Config file {path} is not valid TOML: {e}. Fix the file and try again.") from None
    return RunConfig.from_dict(apply_overrides(d, overrides or []))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(run: RunConfig | dict[str, dict[str, Any]]) -> str:
    """The config as TOML (None values are left out: they mean 'default')."""
    d = run.to_dict() if isinstance(run, RunConfig) else run
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in d.get(section, {}).items() if v is not None]
        lines.append("")
    return "\n".join(lines)
