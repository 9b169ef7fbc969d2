"""The `mlxllm` command: a thin layer that parses arguments and calls the Python API."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

from mlxllm.errors import MlxllmError
from mlxllm.signals import Stopped

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    help="Train small GPT-style language models on your own text with MLX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
tokenizer_app = typer.Typer(help="Tokenizer tools.", no_args_is_help=True)
bench_app = typer.Typer(help="Measure this machine.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(bench_app, name="bench")
err = Console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one paragraph on stderr and exit code 1, never a traceback; a run stopped
    by a signal into its one line and exit code 128 + the signal's number (130 for Ctrl-C)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MlxllmError as e:
            err.print("[bold red]Error:[/] " + escape(str(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Stopped as e:  # a signal during training: the run saved its step and says so
            if str(e):
                err.print(escape(str(e)), highlight=False, soft_wrap=True)
            raise typer.Exit(128 + e.signum) from None
        except KeyboardInterrupt:
            err.print("Interrupted. Checkpoints already written are kept; continue with --resume.")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@friendly
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (see configs/).")] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", "-d", help="Text or .jsonl file, folder of .txt/.md/.jsonl files, or glob (repeatable)."
        ),
    ] = None,
    val_data: Annotated[
        list[str] | None,
        typer.Option("--val-data", help="A validation corpus of its own (text or .jsonl; repeatable): train.val_data."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (default: the config's train.out_dir).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    seconds: Annotated[float | None, typer.Option(help="Stop after this much training time.")] = None,
    tokens: Annotated[int | None, typer.Option(help="Stop after this many training tokens.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override any config key: section.key=value.")] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start from this model: an mlxllm run or checkpoint, or an mlx-lm / Hugging Face Llama directory.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out from its latest checkpoint (none yet: start it).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a run already in --out (never a folder of other files).")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress output.")] = False,
) -> None:
    """Train a tokenizer and a model on text, evaluate, checkpoint and print a sample."""
    from mlxllm.config import load_config
    from mlxllm.distributed import current
    from mlxllm.generate import generate, load
    from mlxllm.trainer import train as run_training

    run = load_config(config, set_)
    given = {
        "data": (data[0] if len(data) == 1 else tuple(data)) if data else None,
        "val_data": (val_data[0] if len(val_data) == 1 else tuple(val_data)) if val_data else None,
        "out_dir": str(out) if out is not None else None,
        "max_steps": steps,
        "max_seconds": seconds,
        "max_tokens": tokens,
        "init_from": init_from,
    }
    run = replace(run, train=replace(run.train, **{k: v for k, v in given.items() if v is not None}))
    result = run_training(run, resume=resume, overwrite=overwrite, show_progress=not quiet)
    if run.train.sample_tokens > 0 and current().primary:  # rank 0 holds the run directory
        model, tok = load(result.run_dir)
        text = generate(
            model, tok, run.train.sample_prompt, run.train.sample_tokens, temperature=0.8, top_k=50, seed=run.train.seed
        )
        Console().print("[bold]Sample:[/]")
        print(run.train.sample_prompt + text)


@app.command("generate")
@friendly
def generate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or one checkpoint directory).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
) -> None:
    """Sample text from a trained run."""
    from mlxllm.generate import generate, load

    if checkpoint not in ("best", "latest"):
        raise MlxllmError(f"--checkpoint must be best or latest (got {checkpoint!r}).")
    model, tok = load(run_dir, checkpoint)
    print(
        prompt + generate(model, tok, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    )


@app.command("eval")
@friendly
def eval_cmd(
    model: Annotated[Path, typer.Argument(help="A run, checkpoint, export, or mlx-lm / Hugging Face Llama directory.")],
    data: Annotated[
        list[str], typer.Option("--data", "-d", help="Text or .jsonl file, folder or glob to measure (repeatable).")
    ],
    seq_len: Annotated[
        int | None, typer.Option(help="Window length (default: the run's train.seq_len, else the model's context).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows evaluated at once.")] = 8,
    mask_prompt: Annotated[
        bool, typer.Option(help="Leave jsonl prompts and non-assistant turns out of the loss, as training does.")
    ] = True,
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
    json_: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Loss, perplexity and bits per byte of a model on a corpus, with the tokens counted."""
    import json

    from mlxllm.evaluate import describe, evaluate_model

    if checkpoint not in ("best", "latest"):
        raise MlxllmError(f"--checkpoint must be best or latest (got {checkpoint!r}).")
    result = evaluate_model(
        model, data, which=checkpoint, seq_len=seq_len, batch_size=batch_size, mask_prompt=mask_prompt, quiet=json_
    )
    if json_:
        print(json.dumps(result.to_dict()))
        return
    for key, value in describe(result).items():
        print(f"{key:<14} {value}")


@app.command("export")
@friendly
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (or one checkpoint directory).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The model directory to write (must not exist yet).")],
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    quantize: Annotated[int | None, typer.Option(help="4 or 8 bits, in mlx-lm's quantized format.")] = None,
    group_size: Annotated[int, typer.Option(help="With --quantize: values per scale and bias, 32, 64 or 128.")] = 64,
    format_: Annotated[str, typer.Option("--format", help="hf (mlx-lm and transformers) or gguf (llama.cpp).")] = "hf",
    checkpoint: Annotated[str, typer.Option(help="best or latest.")] = "best",
) -> None:
    """Write a trained model as a directory that mlx-lm, transformers or llama.cpp load."""
    from mlxllm.export import ExportOptions, export

    opts = ExportOptions(which=checkpoint, dtype=dtype, quantize=quantize, group_size=group_size, format=format_)
    written = export(run_dir, out, opts)
    print(f"Exported {run_dir} to {written}")


@app.command("plot")
@friendly
def plot_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG to write (default: RUN_DIR/loss_curves.png).")
    ] = None,
) -> None:
    """Plot a run's losses, bits per byte and tokens/s against steps, from its metrics.jsonl."""
    from mlxllm.plot import plot_metrics

    path = plot_metrics(run_dir / "metrics.jsonl", out or run_dir / "loss_curves.png")
    print(f"wrote {path}")


@tokenizer_app.command("train")
@friendly
def tokenizer_train(
    data: Annotated[
        list[str] | None, typer.Option("--data", "-d", help="Text file, folder or glob (repeatable).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the tokenizer to.")] = Path("tokenizer"),
    kind: Annotated[str, typer.Option(help="bpe or byte.")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="Number of BPE pieces.")] = 2048,
) -> None:
    """Train a tokenizer on its own and save it."""
    from mlxllm.config import TokenizerConfig
    from mlxllm.corpus import open_corpus
    from mlxllm.data import corpus_lines
    from mlxllm.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus_lines(open_corpus(data)), TokenizerConfig(kind=kind, vocab_size=vocab_size))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"Saved a {kind} tokenizer with {tok.vocab_size} tokens to {out}")


@app.command()
@friendly
def info() -> None:
    """Show the MLX device, the BLAS in use and the measured matmul peak."""
    from mlxllm.config import ModelConfig, TrainConfig
    from mlxllm.cpu import blas
    from mlxllm.device import backend, describe_cpu, device_name, peak_flops
    from mlxllm.distributed import group
    from mlxllm.step import stream_count

    import mlx.core as mx

    g = group()  # under mlx.launch, every process prints its own place in the group
    with g.in_turn("measuring the machine"):
        peak, source = peak_flops()
    print(f"mlx {mx.__version__}, device {device_name()} ({backend()})")
    print(
        f"group: {g.describe()}"
        + (f", backend {g.backend}" if g.size > 1 else " (start several with mlx.launch to train data-parallel)")
    )
    print(f"CPU: {describe_cpu()}")
    print(f"BLAS: {blas.describe()}")
    print(f"peak fp32 matmul: {peak / 1e9:,.0f} GFLOP/s ({source})")
    if backend() == "cpu":
        from mlxllm.cpu import bf16matmul

        print(f"train.dtype = bfloat16 on this CPU: {bf16matmul.describe()}")
    big = ModelConfig(vocab_size=65, n_layers=4, d_model=256, n_heads=4, max_seq_len=256)
    streams = stream_count(TrainConfig(), big)
    print(f"training streams (train.cpu_streams=0; a 4 x 256 model, context 256, batch 16): {streams}")
    if blas.warning(backend()):
        err.print("[bold yellow]Warning:[/] " + escape(blas.warning(backend())), highlight=False, soft_wrap=True)


@bench_app.command("attention")
@friendly
def bench_attention_cmd(
    lengths: Annotated[str, typer.Option(help="Comma-separated sequence lengths.")] = "256,512,1024,2048,4096",
    batch: Annotated[int, typer.Option()] = 1,
    heads: Annotated[int, typer.Option()] = 8,
    head_dim: Annotated[int, typer.Option()] = 64,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    record: Annotated[
        bool, typer.Option(help="Save the fastest implementation as this device's 'auto' choice.")
    ] = False,
) -> None:
    """Time and peak memory of attention forward+backward, per implementation, side by side."""
    from mlxllm.bench.attention import bench_attention, print_table

    try:
        ls = tuple(int(x) for x in lengths.split(","))
    except ValueError:
        raise MlxllmError(f"--lengths must be comma-separated integers such as 256,1024 (got {lengths!r}).") from None
    print_table(bench_attention(ls, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, record=record))


@bench_app.command(
    "train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
)
@friendly
def bench_train_cmd(ctx: typer.Context) -> None:
    """Training speed: mlxllm, plain MLX, PyTorch eager, compiled and compiled whole step (--help for options)."""
    from mlxllm.bench.train import main as bench_main

    bench_main(list(ctx.args))


@bench_app.command("generate")
@friendly
def bench_generate_cmd(
    run: Annotated[
        Path | None,
        typer.Option(help="A trained run directory (default: a random init of the default architecture, vocab 2048)."),
    ] = None,
    tokens: Annotated[int, typer.Option(help="New tokens per run.")] = 200,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (random ids).")] = 32,
    rounds: Annotated[int, typer.Option(help="Measured rounds of each implementation (median reported).")] = 5,
    layers: Annotated[int | None, typer.Option(help="Random init: n_layers.")] = None,
    d_model: Annotated[int | None, typer.Option(help="Random init: d_model.")] = None,
    heads: Annotated[int | None, typer.Option(help="Random init: n_heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Random init: n_kv_heads.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Random init: vocab_size.")] = None,
    context: Annotated[int | None, typer.Option(help="Random init: max_seq_len.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random init and the prompt.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Generation speed side by side: mlxllm's decoding and mlx-lm's on the same weights, prompt and decode tokens/s."""
    from mlxllm.bench.generate import architecture
    from mlxllm.bench.generate import main as bench_main

    cfg = architecture(
        {
            "n_layers": layers,
            "d_model": d_model,
            "n_heads": heads,
            "n_kv_heads": kv_heads,
            "vocab_size": vocab,
            "max_seq_len": context,
        }
    )
    if run is not None and cfg is not None:
        raise MlxllmError(
            "--run uses the run's own architecture; drop --layers/--d-model/--heads/--kv-heads/--vocab/--context."
        )
    bench_main(run, cfg, json_path=json_path, prompt_tokens=prompt_tokens, tokens=tokens, rounds=rounds, seed=seed)


def _load_plugins() -> None:
    """Plugins register commands through the `mlxllm.plugins` entry-point group."""
    for ep in entry_points(group="mlxllm.plugins"):
        try:
            ep.load()(app)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the core CLI
            err.print(f"[yellow]Plugin {ep.name!r} could not be loaded: {e}[/]")


def main() -> None:
    _load_plugins()
    app()
