"""`mlxllm export`: a trained run as a model directory that mlx-lm, transformers and llama.cpp load.

The directory is Hugging Face's Llama layout (config.json, model.safetensors, the tokenizer files,
generation_config.json) with a short model card and the run's loss curves; mlxllm's parameter
names are already Llama's, so the weights are written as they are. It is written under a temporary
name and renamed into place, so a failed export leaves nothing half-written.

A LoRA run is written merged: its adapters added into the weights. A QLoRA run's frozen quantized
base is dequantized for that, so its export is a plain float model by default, or quantized again
with --quantize (which rounds the merged weights anew); the model card says which.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlxllm import checkpoint as ckpt
from mlxllm import hf_config, quant
from mlxllm.config import RunConfig, load_config
from mlxllm.errors import MlxllmError
from mlxllm.generate import load
from mlxllm.hf_tokenizer import write_tokenizer
from mlxllm.model import Transformer

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

DTYPES = ("float32", "float16", "bfloat16")
FORMATS = ("hf", "gguf")
QUANT_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # MLX's affine quantization; 64 is mlx-lm's default


@dataclass(frozen=True)
class ExportOptions:
    which: str = "best"  # best or latest checkpoint
    dtype: str = "float32"
    quantize: int | None = None  # bits, in mlx-lm's quantized format
    group_size: int = 64  # with quantize: the values that share one scale and bias
    format: str = "hf"

    def __post_init__(self) -> None:
        problems = []
        if self.which not in ("best", "latest"):
            problems.append(f"--checkpoint must be best or latest (got {self.which!r})")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.quantize is not None and self.quantize not in QUANT_BITS:
            problems.append(f"--quantize must be 4 or 8 (got {self.quantize!r})")
        if self.group_size not in GROUP_SIZES:
            problems.append(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} (got {self.group_size!r})")
        if self.format not in FORMATS:
            problems.append(f"--format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.format == "gguf" and self.quantize is not None:
            problems.append("--quantize is mlx-lm's format; for GGUF quantize the file with llama.cpp's llama-quantize")
        if problems:
            raise MlxllmError("Cannot export: " + "; ".join(problems) + ".")


def _quantize(model: Transformer, bits: int, group_size: int) -> dict:
    def fits(_: str, m: nn.Module) -> bool:  # as mlx_lm.convert chooses
        return hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=fits)
    return {"group_size": group_size, "bits": bits, "mode": "affine"}


def write_weights(
    model: Transformer, directory: Path, dtype: str, quantize: int | None, group_size: int = 64
) -> dict | None:
    """model.safetensors in dtype, quantized to `quantize` bits in groups of `group_size` when given
    (those layers keep their packed weights); returns the quantization."""
    model.set_dtype(getattr(mx, dtype))
    quantization = _quantize(model, quantize, group_size) if quantize else None
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    return quantization


def weights_note(run: RunConfig, state: dict, opts: ExportOptions) -> str:
    """The model card's line on the weights: their dtype or quantization, and what a (Q)LoRA run's are."""
    if opts.quantize:
        written = f"quantized to {opts.quantize} bits, group size {opts.group_size} (mlx-lm's affine format)"
    else:
        written = f"{opts.dtype}, not quantized"
    t, base = run.train, state.get("quantization")
    if base:
        again = ", then quantized again" if opts.quantize else ""
        return (
            f"- Weights: {written}. The run trained LoRA adapters (rank {t.lora_rank}) over a frozen quantized "
            f"base ({quant.describe(base)}: QLoRA); that base was dequantized and the adapters merged into it{again}."
        )
    if t.lora_rank:
        return f"- Weights: {written}. The run trained LoRA adapters (rank {t.lora_rank}), merged into the weights."
    return f"- Weights: {written}."


def model_card(run: RunConfig, state: dict, n_params: int, has_plot: bool, weights: str = "") -> str:
    """weights: the line weights_note writes (left out when empty)."""
    m = run.model
    loss, bpb = state.get("val_loss"), state.get("val_bpb")
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, mlxllm, llama]",
        "---",
        "",
        "# A small Llama-style model trained with mlxllm",
        "",
        f"- Architecture: Llama decoder, {m.n_layers} layers x {m.d_model}, {m.n_heads} heads ({m.kv_heads} KV), "
        f"MLP {m.hidden_dim}, context {m.max_seq_len}, RoPE theta {m.rope_theta:g}, "
        f"{'tied' if m.tie_embeddings else 'untied'} embeddings; {n_params:,} parameters.",
        f"- Tokenizer: {run.tokenizer.kind}, {m.vocab_size} tokens.",
        *([weights] if weights else []),
        f"- Data: {_data(run.train.data)}.",
        f"- Training: {state.get('step')} steps, {state.get('tokens', 0):,} tokens, {state.get('elapsed', 0):.0f} s.",
        "- Validation: " + (f"loss {loss:.4f}, {bpb:.3f} bits per byte." if loss is not None else "not evaluated."),
        "",
        "```bash",
        "mlx_lm.generate --model . --prompt 'Once upon a time'",
        "```",
    ]
    if has_plot:
        lines += ["", "![Loss curves](loss_curves.png)"]
    return "\n".join(lines) + "\n"


def _data(spec: str | tuple[str, ...] | None) -> str:
    if spec is None:
        return "mlxllm's built-in corpus (Python standard library sources)"
    return spec if isinstance(spec, str) else ", ".join(spec)


def _write_hf(chosen: Path, tmp: Path, opts: ExportOptions) -> None:
    run = load_config(chosen / "config.toml")
    model, tok = load(chosen)
    n_params = run.model.num_params()
    quantization = write_weights(model, tmp, opts.dtype, opts.quantize, opts.group_size)
    config = hf_config.to_hf(run.model, dtype=opts.dtype, eos_id=tok.eos_id)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(hf_config.generation_config(tok.eos_id), indent=2) + "\n")
    write_tokenizer(tok, tmp, max_len=run.model.max_seq_len)
    has_plot = _plot(chosen.parent.parent, tmp / "loss_curves.png")
    state = ckpt.read_state(chosen)
    (tmp / "README.md").write_text(model_card(run, state, n_params, has_plot, weights_note(run, state, opts)))


def _plot(run_dir: Path, png: Path) -> bool:
    from mlxllm.plot import plot_metrics

    try:
        plot_metrics(run_dir / "metrics.jsonl", png)
    except MlxllmError:  # no metrics or no matplotlib: the card says nothing of a plot
        return False
    return True


def _write_gguf(chosen: Path, tmp: Path, opts: ExportOptions) -> None:
    from mlxllm.gguf import write_gguf

    model, tok = load(chosen)
    write_gguf(model, tok, tmp / "model.gguf", dtype=opts.dtype)


def export(path: str | Path, out: str | Path, options: ExportOptions | None = None) -> Path:
    """Export a run's best (or latest) checkpoint to out; returns out."""
    opts = options or ExportOptions()
    path, out = Path(path), Path(out)
    chosen = ckpt.choose(path, opts.which)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MlxllmError(
            f"{out} already exists and is not empty; nothing was written. Choose another --out or remove it."
        )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (_write_gguf if opts.format == "gguf" else _write_hf)(chosen, tmp, opts)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
