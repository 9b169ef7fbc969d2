"""Every config of a run, and its TOML form: [model], [tokenizer] and [train] tables, overridable key by key.

Each config is a frozen dataclass that checks itself when made, so a bad value is refused before
anything is trained or written.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mlxllm.errors import MlxllmError

SECTIONS = ("model", "tokenizer", "train")
# auto: this device's choice (kernels.select); fast: mx.fast.scaled_dot_product_attention; flash: the
# fused kernels (their tiled MLX form on a CPU); tiled: that tiled form; halves: causal attention as two
# query halves with its gradient written out (cpu/halves.py) from 128 tokens, the reference below;
# reference: the whole score matrix in plain MLX ops at every length (a baseline, never the faster).
ATTENTION_IMPLS = ("auto", "fast", "flash", "tiled", "halves", "reference")
TOKENIZER_KINDS = ("bpe", "byte", "hf")  # hf: a pretrained model's tokenizer.json (train.init_from)
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")
MICRO_BATCHES = ("fixed", "auto")


def _refuse(what: str, problems: list[str]) -> None:
    if problems:
        raise MlxllmError(f"Invalid {what} config: " + "; ".join(problems) + ".")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer when training starts
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    ffn_dim: int | None = None  # None: derived from mlp_ratio, rounded up to a multiple of 32
    mlp_ratio: float = 8 / 3
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention: str = "auto"
    # Residual dropout, in training mode only: on the token embeddings and on each attention and MLP
    # output before the residual add (not on attention probabilities, which fused kernels never hold).
    # A probability in [0, 1); 0: off, no random draws.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be a positive integer (got {getattr(self, name)!r})"
            for name in ("n_layers", "d_model", "n_heads", "max_seq_len")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if not isinstance(self.vocab_size, int) or self.vocab_size < 0:
            problems.append(f"vocab_size must be a non-negative integer (got {self.vocab_size!r})")
        _refuse("model", problems)  # the checks below divide by these
        if self.d_model % self.n_heads:
            problems.append(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                f"try d_model = {self.n_heads * max(1, round(self.d_model / self.n_heads / 2) * 2)}"
            )
        elif self.head_dim % 2:
            problems.append(
                f"head_dim = d_model / n_heads = {self.head_dim} must be even for rotary embeddings; "
                "change d_model or n_heads"
            )
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            problems.append(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads}); "
                "use a divisor of n_heads such as 1 or n_heads itself"
            )
        if self.ffn_dim is not None and self.ffn_dim < 1:
            problems.append(f"ffn_dim must be positive (got {self.ffn_dim})")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be positive (got {self.mlp_ratio})")
        if self.attention not in ATTENTION_IMPLS:
            problems.append(f"attention must be one of {', '.join(ATTENTION_IMPLS)} (got {self.attention!r})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(
                f"dropout must be a probability in [0, 1) (got {self.dropout!r}); 0 turns it off, and 0.1 is a "
                "usual start when the corpus is repeated for many epochs"
            )
        else:
            object.__setattr__(self, "dropout", float(self.dropout))  # TOML's 0 is an int
        _refuse("model", problems)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return 32 * math.ceil(self.mlp_ratio * self.d_model / 32)

    def num_params(self, embeddings: bool = True) -> int:
        d, h, kv, f = self.d_model, self.head_dim, self.kv_heads, self.hidden_dim
        per_layer = d * self.n_heads * h * 2 + d * kv * h * 2 + 3 * d * f + 2 * d
        n = self.n_layers * per_layer + d
        if embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            n += self.vocab_size * d  # the output projection is real compute
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's estimate."""
        n = self.num_params(embeddings=False)
        if self.tie_embeddings:
            n += self.vocab_size * self.d_model  # the tied output projection is still a matmul
        return 6 * n + 6 * self.n_layers * self.d_model * seq_len  # causal: half of 12*L*d*T


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "bpe"
    vocab_size: int = 2048  # an upper bound for BPE: a small corpus may give fewer pieces

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise MlxllmError(f"tokenizer.kind must be one of {', '.join(TOKENIZER_KINDS)} (got {self.kind!r}).")
        if self.kind == "bpe" and not 260 <= self.vocab_size <= 65536 * 16:
            raise MlxllmError(
                f"tokenizer.vocab_size must be between 260 and 1048576 for BPE (got {self.vocab_size}); "
                "it needs room for the 256 byte-fallback pieces."
            )


@dataclass(frozen=True)
class TrainConfig:
    data: str | tuple[str, ...] | None = None  # files, folders or globs; None: the built-in corpus
    out_dir: str = "runs/default"
    # Start from this model (an mlxllm run or checkpoint, or an mlx-lm / Hugging Face Llama directory):
    # its shape, weights and tokenizer; the [model] and [tokenizer] tables are then not used.
    init_from: str | None = None
    # LoRA (with init_from): train adapters of this rank on the projections, the model frozen; 0: off.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    batch_size: int = 16
    seq_len: int | None = None  # None: the model's max_seq_len
    grad_accum: int = 1
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule decays to learning_rate * min_lr_ratio
    warmup_steps: int = 20
    # After the warmup: "cosine" falls along a half cosine over the whole run to the floor; "wsd"
    # (warmup-stable-decay) holds learning_rate, then decays over the last cooldown_fraction of the run
    # (its steps, tokens or seconds), so that a checkpoint of its stable phase plus a cooldown is a
    # finished shorter run (mlxllm.branch makes one).
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2  # wsd: the share of the run spent in the cooldown, in (0, 1)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "float32"
    max_steps: int = 100  # the quick start: a couple of minutes on 2 CPU cores
    max_tokens: int | None = None
    max_seconds: float | None = None
    eval_interval: int = 50  # evaluate, then checkpoint, every N steps
    eval_batches: int = 10
    # Stop when this many evaluations in a row have not lowered the best validation loss (the best
    # checkpoint is kept, as always); 0: off.
    early_stop_patience: int = 0
    log_interval: int = 10
    keep_last: int = 2
    seed: int = 0
    val_fraction: float = 0.1
    # A corpus (files, folders or globs, text or jsonl) that is the whole validation split; `data` then
    # trains whole. None: the last val_fraction of each text block, and every 1/val_fraction-th record.
    val_data: str | tuple[str, ...] | None = None
    # jsonl prompt/completion and messages records: the loss on the completion / assistant turns only.
    # False: on every token. text records and text files always count whole.
    mask_prompt: bool = True
    compile: bool = True
    # Each micro-batch is split over this many CPU streams, one thread each, gradients averaged.
    # 0: one per core on the Linux CPU backend (batch_size and model size permitting), else 1.
    cpu_streams: int = 0
    # Data-parallel (under mlx.launch): the dtype the gradients are averaged in across processes.
    allreduce_dtype: str = "float32"
    # Recompute each block's activations in the backward pass (mx.checkpoint) instead of keeping them:
    # about a third more compute, for the memory of one block's activations instead of every block's.
    grad_checkpoint: bool = False
    # "fixed": micro-batches of batch_size rows, as given. "auto": when the memory estimate says they
    # do not fit, the same global batch (batch_size x grad_accum rows, the same rows in the same order)
    # in the largest micro-batches that fit (a larger grad_accum), else with grad_checkpoint on; said
    # in one line. A run that fits neither way is refused.
    micro_batch: str = "fixed"
    sample_tokens: int = 200
    sample_prompt: str = ""

    def __post_init__(self) -> None:
        for name in ("data", "val_data"):  # from TOML: kept as a tuple, so that the config stays hashable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = (
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "keep_last",
        )
        problems = [
            f"{name} must be a positive integer (got {getattr(self, name)!r})"
            for name in positive
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            problems.append(f"lora_rank must be 0 (off) or a positive integer (got {self.lora_rank!r})")
        elif self.lora_rank and not self.init_from:
            problems.append("lora_rank needs init_from: LoRA adapts a pretrained model (--init-from PATH)")
        p = self.early_stop_patience
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            problems.append(
                f"early_stop_patience must be 0 (off) or a positive integer, the evaluations in a row without a "
                f"lower validation loss before the run stops (got {p!r})"
            )
        if self.seq_len is not None and (not isinstance(self.seq_len, int) or self.seq_len < 1):
            problems.append(f"seq_len must be a positive integer (got {self.seq_len!r})")
        if not isinstance(self.cpu_streams, int) or self.cpu_streams < 0:
            problems.append(f"cpu_streams must be 0 (auto) or a positive integer (got {self.cpu_streams!r})")
        elif self.cpu_streams and self.batch_size % self.cpu_streams:
            problems.append(f"batch_size ({self.batch_size}) must be a multiple of cpu_streams ({self.cpu_streams})")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.allreduce_dtype not in ("float32", "bfloat16"):
            problems.append(f"allreduce_dtype must be float32 or bfloat16 (got {self.allreduce_dtype!r})")
        if not isinstance(self.grad_checkpoint, bool):
            problems.append(f"grad_checkpoint must be true or false (got {self.grad_checkpoint!r})")
        if self.micro_batch not in MICRO_BATCHES:
            problems.append(
                f"micro_batch must be one of {', '.join(MICRO_BATCHES)} (got {self.micro_batch!r}); auto splits a "
                "batch that does not fit the memory into smaller micro-batches"
            )
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be positive (got {self.learning_rate})")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be between 0 and 1 (got {self.min_lr_ratio})")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        f = self.cooldown_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            problems.append(
                f"cooldown_fraction must be a number between 0 and 1, both excluded (got {f!r}): the share "
                "of a wsd run spent decaying the learning rate, 0.2 for example"
            )
        if not isinstance(self.mask_prompt, bool):
            problems.append(f"mask_prompt must be true or false (got {self.mask_prompt!r})")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens must be positive (got {self.max_tokens})")
        if self.max_seconds is not None and self.max_seconds <= 0:
            problems.append(f"max_seconds must be positive (got {self.max_seconds})")
        _refuse("training", problems)


Config = TypeVar("Config")
_CLASSES: dict[str, type] = {"model": ModelConfig, "tokenizer": TokenizerConfig, "train": TrainConfig}


def from_dict(cls: type[Config], d: dict[str, Any]) -> Config:
    """A config from a TOML table; unknown keys are refused with the valid ones."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        table = next((s for s, c in _CLASSES.items() if c is cls), cls.__name__)
        raise MlxllmError(
            f"Unknown {table} config key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(names))}."
        )
    return cls(**d)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    tokenizer: TokenizerConfig
    train: TrainConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise MlxllmError(
                f"Unknown config table(s) [{'], ['.join(unknown)}]. Valid tables: [model], [tokenizer], [train]."
            )
        return cls(**{s: from_dict(_CLASSES[s], d.get(s, {})) for s in SECTIONS})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as a path


def _section_of(key: str, owners: dict[str, list[str]]) -> tuple[str, str]:
    """(section, name) of an override's key, `section.key` or a `key` that one section has."""
    section, _, name = key.rpartition(".")
    if not section:
        sections = owners.get(name, [])
        if len(sections) != 1:
            where = "; ".join(f"{s}: {', '.join(sorted(k for k, o in owners.items() if s in o))}" for s in SECTIONS)
            raise MlxllmError(
                f"Unknown config key {name!r}"
                if not sections
                else f"Ambiguous config key {name!r}" + f". Use section.key; valid keys are {where}."
            )
        section = sections[0]
    if section not in SECTIONS or section not in owners.get(name, []):
        valid = ", ".join(sorted(k for k, o in owners.items() if section in o)) if section in SECTIONS else ""
        raise MlxllmError(
            f"Unknown config key {key!r}. "
            + (f"Valid [{section}] keys: {valid}." if valid else "Tables are model, tokenizer and train.")
        )
    return section, name


def apply_overrides(d: dict[str, dict[str, Any]], overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Apply `section.key=value` (or `key=value` when the key is unique) overrides."""
    owners: dict[str, list[str]] = {}
    for section, cls in _CLASSES.items():
        for f in fields(cls):
            owners.setdefault(f.name, []).append(section)
    out = {s: dict(v) for s, v in d.items()}
    for s in SECTIONS:
        out.setdefault(s, {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise MlxllmError(f"Override {item!r} is not of the form key=value (for example train.learning_rate=3e-4).")
        section, name = _section_of(key.strip(), owners)
        out[section][name] = None if value.strip().lower() == "none" else _parse_value(value.strip())
    return out


def read_toml(path: str | Path, what: str, examples: str) -> dict[str, Any]:
    """A TOML file's tables; a missing or broken file is an MlxllmError that names `examples`."""
    path = Path(path)
    if not path.is_file():
        raise MlxllmError(f"{what} {path} does not exist. {examples}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MlxllmError(f"{what} {path} is not valid TOML: {e}. Fix the file and try again.") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults) and apply overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        d = read_toml(
            path, "Config file", "The configs/ folder has examples (tiny.toml, shakespeare.toml, small.toml)."
        )
    return RunConfig.from_dict(apply_overrides(d, overrides or []))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
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
