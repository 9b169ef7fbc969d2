"""Generation speed: mlxllm's decoding side by side with mlx-lm's, on the same weights, in one run.

Both run greedy decoding in this process, on the same BLAS and threads, from the same prompt: mlxllm
through `mlxllm.generate.stream_ids`, mlx-lm through its own `mlx_lm.generate.generate_step` on an
mlx-lm Llama model holding mlxllm's weights (the parameter names are the same). A warm-up run of
each comes first (it traces and compiles), then measured rounds alternate between the two, each
round starting with the other implementation. Per run: prompt tokens/s is the prompt length over
the time to the first generated token; decode tokens/s is the remaining tokens over the time from
the first token to the last. Reported: the median over the rounds, and whether the two greedy
continuations are the same ids.

    mlxllm bench generate
    mlxllm bench generate --run runs/shakespeare --tokens 200 --rounds 7
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mlxllm import hf_config
from mlxllm.config import ModelConfig
from mlxllm.errors import MlxllmError
from mlxllm.model import Transformer, build_model

import mlx.core as mx
from mlx.utils import tree_flatten

IMPLS = ("mlxllm", "mlx-lm")
IMPL_NOTES = {
    "mlxllm": "mlxllm.generate.stream_ids (the decoding `mlxllm generate` runs)",
    "mlx-lm": "mlx_lm.generate.generate_step on the same weights, exported and loaded by mlx_lm.utils.load_model",
}


def mlx_lm_available() -> str | None:
    """None when mlx-lm can be imported, else why not."""
    if importlib.util.find_spec("mlx_lm") is None:
        return "mlx-lm is not installed (pip install mlx-lm to compare against it)"
    return None


def benchmark_model(run: str | Path | None, cfg: ModelConfig | None, seed: int = 0) -> tuple[Transformer, str]:
    """The model to measure and a line describing it: a trained run's, else a random init of cfg
    (default: the default architecture with a 2048-token vocabulary)."""
    if run is not None:
        from mlxllm.generate import load

        model, _ = load(run)
        return model, f"trained run {run}"
    model = build_model(cfg or ModelConfig(vocab_size=2048), seed=seed)
    return model, f"random init (seed {seed})"


def mlx_lm_twin(model: Transformer) -> Any:
    """mlx-lm's own model, loaded by mlx-lm from `model` written as `mlxllm export` writes it."""
    from mlx_lm.utils import load_model

    with tempfile.TemporaryDirectory() as d:
        mx.save_safetensors(str(Path(d) / "model.safetensors"), dict(tree_flatten(model.parameters())))
        config = hf_config.to_hf(model.config, dtype="float32", eos_id=0)
        (Path(d) / "config.json").write_text(json.dumps(config))
        twin, _ = load_model(Path(d))  # not lazy: the weights are read before the folder goes
    twin.eval()
    return twin


def _streams(model: Transformer, twin: Any | None) -> dict[str, Callable[[list[int], int], Iterable[int]]]:
    from mlxllm.generate import Decoder, stream_ids

    decoder = Decoder(model)  # one for every run: the warm-up traces its step, the rounds reuse it
    streams: dict[str, Callable[[list[int], int], Iterable[int]]] = {
        "mlxllm": lambda prompt, n: stream_ids(model, prompt, n, temperature=0.0, decoder=decoder),
    }
    if twin is not None:
        from mlx_lm.generate import generate_step

        streams["mlx-lm"] = lambda prompt, n: (int(y) for y, _ in generate_step(mx.array(prompt), twin, max_tokens=n))
    return streams


def time_run(stream: Iterable[int], prompt_len: int) -> dict[str, Any]:
    """Consume one generation: its ids, prompt tokens/s and decode tokens/s."""
    start = time.perf_counter()
    it = iter(stream)
    first = next(it)
    t_first = time.perf_counter()
    rest = list(it)
    end = time.perf_counter()
    return {
        "ids": [first, *rest],
        "prompt_tps": prompt_len / (t_first - start),
        "decode_tps": len(rest) / (end - t_first) if rest else float("nan"),
    }


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading ids two continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_benchmark(
    run: str | Path | None = None,
    cfg: ModelConfig | None = None,
    *,
    prompt_tokens: int = 32,
    tokens: int = 200,
    rounds: int = 5,
    seed: int = 0,
    impls: tuple[str, ...] = IMPLS,
) -> dict[str, Any]:
    """Measure each implementation; returns the table's data (see print_table)."""
    model, source = benchmark_model(run, cfg, seed)
    c = model.config
    if prompt_tokens < 1 or tokens < 2 or rounds < 1:
        raise MlxllmError("--prompt-tokens must be >= 1, --tokens >= 2 and --rounds >= 1.")
    if prompt_tokens + tokens > c.max_seq_len:
        raise MlxllmError(
            f"--prompt-tokens + --tokens ({prompt_tokens + tokens}) is past this model's context window "
            f"({c.max_seq_len}). There mlxllm restarts from the window's most recent half and mlx-lm does not, "
            "so their outputs would differ by design; choose fewer tokens."
        )
    notes = []
    missing = mlx_lm_available() if "mlx-lm" in impls else None
    if missing:
        notes.append(f"mlx-lm skipped: {missing}")
    streams = _streams(model, None if missing or "mlx-lm" not in impls else mlx_lm_twin(model))
    streams = {k: v for k, v in streams.items() if k in impls}
    key = mx.random.key(seed + 1)
    prompt = mx.random.randint(0, c.vocab_size, (prompt_tokens,), key=key).tolist()
    for stream in streams.values():  # warm-up: traces, compiles, fills the allocator's cache
        time_run(stream(prompt, tokens), prompt_tokens)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in streams}
    order = list(streams)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            runs[name].append(time_run(streams[name](prompt, tokens), prompt_tokens))
    reference = runs["mlx-lm"][0]["ids"] if "mlx-lm" in runs else None
    rows = []
    for name, rs in runs.items():
        rows.append(
            {
                "impl": name,
                "note": IMPL_NOTES[name],
                "prompt_tps": statistics.median(x["prompt_tps"] for x in rs),
                "decode_tps": statistics.median(x["decode_tps"] for x in rs),
                "decode_tps_rounds": [x["decode_tps"] for x in rs],
                "prompt_tps_rounds": [x["prompt_tps"] for x in rs],
                "same_each_round": all(x["ids"] == rs[0]["ids"] for x in rs),
                "agrees_with_mlx_lm": None if reference is None else agreement(rs[0]["ids"], reference),
            }
        )
    return {
        "model": source,
        "config": {
            k: getattr(c, k)
            for k in ("n_layers", "d_model", "n_heads", "kv_heads", "hidden_dim", "vocab_size", "max_seq_len")
        },
        "prompt_tokens": prompt_tokens,
        "tokens": tokens,
        "rounds": rounds,
        "rows": rows,
        "notes": notes,
        "system": system_line(),
    }


def system_line() -> str:
    """The CPU (and device), the MLX and mlx-lm versions and the BLAS: what the figures depend on."""
    from mlxllm import device
    from mlxllm.cpu import blas

    cpu = device.describe_cpu() if hasattr(device, "describe_cpu") else device._cpu_model()
    versions = [f"mlx {mx.__version__}"]
    if mlx_lm_available() is None:
        from importlib.metadata import version

        versions.append(f"mlx-lm {version('mlx-lm')}")
    where = f"CPU {cpu}" if device.backend() == "cpu" else f"device {device.device_name()}, CPU {cpu}"
    return f"{where}; {', '.join(versions)}; BLAS: {blas.describe()}"


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    c = result["config"]
    title = (
        f"Greedy generation, {c['n_layers']} layers x d_model {c['d_model']}, {c['n_heads']} heads "
        f"({c['kv_heads']} KV), ffn {c['hidden_dim']}, vocab {c['vocab_size']}, {result['model']}: "
        f"{result['prompt_tokens']}-token prompt, {result['tokens']} new tokens"
    )
    t = Table(title=title)
    for col in ("implementation", "prompt tokens/s", "decode tokens/s", "decode vs mlx-lm", "same ids as mlx-lm"):
        t.add_column(col, justify="left" if col == "implementation" else "right")
    base = next((r["decode_tps"] for r in result["rows"] if r["impl"] == "mlx-lm"), None)
    for r in result["rows"]:
        same = r["agrees_with_mlx_lm"]
        t.add_row(
            r["impl"],
            f"{r['prompt_tps']:,.0f}",
            f"{r['decode_tps']:,.0f}",
            f"{r['decode_tps'] / base:.2f}x" if base else "-",
            "-" if same is None else ("all" if same == result["tokens"] else f"first {same} of {result['tokens']}"),
        )
    console.print(t)
    console.print(f"  {result['system']}")
    console.print(
        f"  medians of {result['rounds']} interleaved rounds after a warm-up run of each; "
        + "; ".join(f"{r['impl']}: {r['note']}" for r in result["rows"])
    )
    for n in result["notes"]:
        console.print(f"[yellow]{n}[/yellow]")


def architecture(overrides: dict[str, int | None]) -> ModelConfig | None:
    """ModelConfig() with vocab 2048 and these fields replaced (None: keep), or None when none is given."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return ModelConfig(**{"vocab_size": 2048, **given}) if given else None


def main(
    run: str | Path | None = None,
    cfg: ModelConfig | None = None,
    *,
    json_path: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run, print the table, and write the results as JSON when json_path is given."""
    result = run_benchmark(run, cfg, **options)
    print_table(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result
