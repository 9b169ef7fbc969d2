"""`mlxllm eval`: the loss, perplexity and bits per byte of a model on a corpus, with the number of
tokens they are measured over.

The model is anything `generate` loads (an mlxllm run or checkpoint, an `mlxllm export`, an mlx-lm or
Hugging Face Llama directory); the corpus anything `--data` takes, text or jsonl, tokenized by the
model's own tokenizer and, for jsonl records, rendered and masked as training renders and masks them.
The whole corpus is measured in non-overlapping windows from its start, as a run's validation split
is (the tokens after the last whole window are left out), so a run's own validation corpus given
here gives the loss the run reported.
"""

from __future__ import annotations

import glob
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from mlxllm import data as data_mod
from mlxllm import pretrained
from mlxllm.config import TrainConfig, load_config
from mlxllm.corpus import Spec
from mlxllm.errors import MlxllmError
from mlxllm.pretrained import Pretrained
from mlxllm.step import cpu_split, evaluate, make_eval

# The window of a model that names no training context of its own (a Hugging Face model's is often
# far longer than a corpus needs, and its activations would not fit).
DEFAULT_MAX_WINDOW = 1024


@dataclass(frozen=True)
class EvalResult:
    model: str
    data: list[str]
    loss: float  # mean cross-entropy (nats) over the counted target tokens
    perplexity: float
    bits_per_byte: float
    tokens: int  # target tokens counted
    windows: int
    seq_len: int
    masked: bool  # some tokens (the prompts of jsonl records) were not counted

    def to_dict(self) -> dict:
        return asdict(self)


def _check_paths(model: Path, specs: list[str]) -> None:
    if not model.exists():
        raise MlxllmError(
            f"The model {model} does not exist. Give mlxllm eval a run directory, one of its checkpoints, an "
            "`mlxllm export` or an mlx-lm / Hugging Face Llama directory."
        )
    if not specs:
        raise MlxllmError("mlxllm eval needs a corpus to measure: --data FILE (a text or .jsonl file, folder or glob).")
    for spec in specs:
        if not Path(spec).expanduser().exists() and not (any(c in spec for c in "*?[") and glob.glob(spec)):
            raise MlxllmError(
                f"The data {spec} does not exist. Give --data a text or .jsonl file, a folder of them, or a glob "
                "(quoted, so that the shell keeps it)."
            )


def _window(found: Pretrained, seq_len: int | None) -> int:
    """The window: seq_len, else the run's own train.seq_len, else the model's context (at most
    DEFAULT_MAX_WINDOW for a model that was not trained here)."""
    context = found.config.max_seq_len
    if seq_len is not None:
        if not 0 < seq_len <= context:
            raise MlxllmError(f"--seq-len must be between 1 and the model's context, {context} (got {seq_len}).")
        return seq_len
    if (found.source / "config.toml").is_file():  # an mlxllm checkpoint: the window it was validated with
        return load_config(found.source / "config.toml").train.seq_len or context
    return min(context, DEFAULT_MAX_WINDOW)


def evaluate_model(
    model: str | Path,
    data: Spec,
    *,
    which: str = "best",
    seq_len: int | None = None,
    batch_size: int = 8,
    mask_prompt: bool = True,
    quiet: bool = True,
) -> EvalResult:
    """Measure model on data, as `mlxllm eval` does.

    model: a run directory, checkpoint, export or Llama directory; data: files, folders or globs;
    which: a run's best or latest checkpoint; seq_len: the window (None: see _window); batch_size:
    windows evaluated at once (the result does not depend on it); mask_prompt: leave jsonl prompts
    out of the loss, as training does; quiet: say nothing while tokenizing."""
    specs = [] if data is None else [str(data)] if isinstance(data, (str, Path)) else [str(d) for d in data]
    _check_paths(Path(model), specs)
    if batch_size < 1:
        raise MlxllmError(f"--batch-size must be a positive integer (got {batch_size}).")
    found = pretrained.find(model, which)
    window = _window(found, seq_len)
    tokens = data_mod.prepare_eval(specs, found.tokenizer, mask_prompt=mask_prompt, quiet=quiet)
    n = len(tokens.val)
    if n < 2:
        raise MlxllmError(f"The corpus {', '.join(specs)} is too short to measure: it holds {n} token(s).")
    window = min(window, n - 1)  # a corpus shorter than one window is one shorter window
    n_windows = (n - 1) // window
    batches = data_mod.windows(tokens, batch_size, window, n_windows)
    counted = sum(data_mod.counted_targets(b) for b in batches)
    if counted == 0:
        raise MlxllmError(
            f"No token of {', '.join(specs)} counts: its records have no completion or assistant turn. "
            "Measure every token with --no-mask-prompt."
        )
    net = pretrained.build(found)
    cfg = TrainConfig(batch_size=batch_size)  # float32, compiled
    with cpu_split(cfg, found.config) as split:
        metrics = evaluate(make_eval(net, cfg, split), batches, tokens.bytes_per_token)
    loss = metrics["val_loss"]
    return EvalResult(
        model=str(model),
        data=specs,
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        bits_per_byte=metrics["val_bpb"],
        tokens=counted,
        windows=n_windows,
        seq_len=window,
        masked=tokens.val_mask is not None,
    )


def describe(r: EvalResult) -> dict[str, str]:
    """The result as rows of a summary table."""
    return {
        "model": r.model,
        "data": ", ".join(r.data),
        "loss": f"{r.loss:.4f}",
        "perplexity": f"{r.perplexity:.3f}",
        "bits per byte": f"{r.bits_per_byte:.4f}",
        "tokens": f"{r.tokens:,}" + (" (completions and assistant turns only)" if r.masked else ""),
        "windows": f"{r.windows:,} of {r.seq_len} tokens",
    }
