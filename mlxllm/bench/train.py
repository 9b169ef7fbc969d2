"""Training-speed benchmark: mlxllm's compiled step side by side with a plain MLX loop and PyTorch.

Every implementation runs in its own worker process (so PyTorch's OpenMP threads and MLX's OpenBLAS
threads never share a process, and each one's peak memory is its own), with caches of its own: a fresh
MLXLLM_CACHE_DIR (no recorded attention choice) and Inductor cache (no kernels compiled by an earlier
run). The workers are started and warmed up (compiled) first, then measured in interleaved windows:
round 1 of every worker, round 2, ... so a machine that gets busier or quieter half-way affects them
all alike, the order rotated each round. The first round is a warm-up and is discarded; tokens/s is
the median over the rest. MFU is model FLOPs (ModelConfig.flops_per_token, the figure training reports)
times tokens/s over the fp32 matmul peak measured in this same run (mlxllm.device.measure_matmul_flops).
PyTorch's AdamW is its fused CPU kernel where PyTorch has one (2.4+), except under torch.compile of
the whole step, which traces the foreach AdamW (see torch_reference.make_trainer). --dtype bfloat16 adds
mlxllm's bfloat16 row and PyTorch's bfloat16 autocast rows beside the float32 ones (precision_rows).

    mlxllm bench train
    mlxllm bench train --dtype bfloat16
    mlxllm bench train --json out.json --steps 5 --windows 5
    mlxllm bench train --memory-check   # peak memory after step 100 and 1,000
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from mlxllm.bench.flops import executed_matmul_flops_per_token
from mlxllm.bench.precision_rows import DTYPES, add_eager_ratios, precision_fields, untwinned_note, worker_specs
from mlxllm.bench.train_table import print_table
from mlxllm.bench.workers import COMPILED_MLX, TORCH_REFERENCE, Worker, model_config
from mlxllm.errors import MlxllmError

IMPLS = ("torch-eager", "torch-compile", "torch-compile-step", "mlxllm", "mlxllm-1stream", "mlx-plain")
IMPL_NOTES = {
    "torch-eager": "PyTorch eager (mlxllm/bench/torch_reference.py)",
    "torch-compile": "PyTorch torch.compile over the forward and loss",
    "torch-compile-step": "PyTorch torch.compile over the whole step: forward, backward, clipping, AdamW",
    "mlxllm": "mlxllm.step.make_step (mx.compile, split over one CPU stream per core, as training runs it)",
    "mlxllm-1stream": "the same compiled step on one stream (train.cpu_streams=1), the baseline of the split",
    "mlx-plain": "plain MLX loop: nn.value_and_grad + clip + optimizer.update + mx.eval, no compile",
}

# The model the reference trainers (nanoGPT's Shakespeare character model) use, and a wider one.
DEFAULT_CONFIGS: list[dict[str, Any]] = [
    {"name": "d256", "vocab_size": 65, "n_layers": 4, "d_model": 256, "n_heads": 4, "seq_len": 256, "batch_size": 16},
    {"name": "d512", "vocab_size": 65, "n_layers": 4, "d_model": 512, "n_heads": 8, "seq_len": 256, "batch_size": 16},
]
TINY_CONFIG = {
    "name": "tiny",
    "vocab_size": 65,
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "seq_len": 32,
    "batch_size": 4,
}


def torch_available() -> str | None:
    """None when the PyTorch workers can run, else why not."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install torch to compare against it)"
    if not TORCH_REFERENCE.is_file():
        return f"{TORCH_REFERENCE} is missing: reinstall mlxllm"
    return None


def _theoretical_peak() -> float:
    from mlxllm.device import cpu_facts

    return cpu_facts()["theoretical_peak"] or 0.0


def measure_peak(seconds: float = 1.0) -> float:
    import mlxllm  # noqa: F401
    from mlxllm.device import measure_matmul_flops

    return measure_matmul_flops(seconds=seconds)


def rotated(items: list[Any], k: int) -> list[Any]:
    """`items` starting at position k (mod its length): who goes first changes from round to round."""
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def measure_rounds(workers: list[Worker], windows: int, steps: int, offset: int = 0) -> dict[str, list[dict[str, Any]]]:
    """One warm-up round, then `windows` measured rounds, each worker's window in turn, the order
    rotated every round: the first window after a worker's idle wait (caches, page faults, the CPU
    clocking up, PyTorch's allocator growing) is thrown away, and no implementation always runs right
    after the same other one, or always first. Returns each worker's replies, the warm-up first."""
    rounds: dict[str, list[dict[str, Any]]] = {w.name: [] for w in workers}
    for r in range(1 + windows):
        for w in rotated(workers, offset + r):
            time.sleep(0.2)  # let the previous worker's BLAS/OpenMP threads go idle
            rounds[w.name].append(w.window(steps))
    return rounds


def _bench_config(
    cfg: dict[str, Any], specs: list[tuple[str, str]], steps: int, warmup: int, windows: int, offset: int
) -> tuple[list[Worker], dict[str, list[dict[str, Any]]]]:
    workers: list[Worker] = []
    try:
        # Started one at a time, so a compile does not compete with another; in a rotated order too.
        for impl, dtype in rotated(list(specs), offset):
            w = Worker(impl, cfg, warmup, dtype)
            w.wait_ready()
            workers.append(w)
        workers.sort(key=lambda w: specs.index((w.impl, w.dtype)))
        return workers, measure_rounds(workers, windows, steps, offset)
    finally:
        for w in workers:
            w.close()


def _executed_flops(cfg: dict[str, Any], workers: list[Worker], dtype: str = "float32") -> float:
    """Executed matmul FLOPs per token with the attention mlxllm's workers ran in `dtype` (else in any dtype;
    on their backend, in what they computed in), applied to every row of that dtype. Without an MLX
    worker, with the attention 'auto' means on this device."""
    mine = sorted(workers, key=lambda w: w.dtype != dtype)
    facts = next((w.ready for w in mine if "attention" in w.ready), None)
    if facts is None:
        from mlxllm.attention import resolve_attention
        from mlxllm.device import backend

        facts = {"attention": resolve_attention(cfg.get("attention", "auto")), "backend": backend()}
    computed = facts.get("compute_dtype", "float32")
    return executed_matmul_flops_per_token(cfg, facts["attention"], facts["backend"], computed)


def _row(
    cfg: dict[str, Any], w: Worker, replies: list[dict[str, Any]], peak: float, peaks: list[float], exec_flops: float
) -> dict[str, Any]:
    warm, ws = replies[0], replies[1:]
    model_flops = model_config(cfg).flops_per_token(cfg["seq_len"])
    tps = statistics.median(r["tokens_per_s"] for r in ws)
    compiled = w.impl in COMPILED_MLX or w.impl.startswith("torch-compile")
    note = IMPL_NOTES[w.impl] + (f", {w.ready['optimizer']} AdamW" if "optimizer" in w.ready else "")
    return {
        "config": cfg["name"],
        "impl": w.impl,
        **precision_fields(w.impl, w.dtype, w.ready),
        "note": note,
        "model": {k: v for k, v in cfg.items() if k not in ("name", "hidden_dim")},
        "tokens_per_s": tps,
        "tokens_per_s_windows": [r["tokens_per_s"] for r in ws],
        "warmup_window": warm,
        "windows": ws,
        "step_ms": 1000 * cfg["batch_size"] * cfg["seq_len"] / tps,
        "mfu": tps * model_flops / peak,
        "exec_mfu": tps * exec_flops / peak,
        "model_flops_per_token": model_flops,
        "peak_measured": max(peaks),
        "exec_flops_per_token": exec_flops,
        "peak_flops": peak,
        "first_step_s": w.ready["first_step_s"],
        "traces": ws[-1]["traces"],
        # Graphs traced after the first step: a recompile (the first step's own count is 1 for MLX,
        # 2 for the whole PyTorch step, whose optimizer step is a graph of its own).
        "recompiles": ws[-1]["traces"] - w.ready["first_traces"] if compiled else None,
        "optimizer": w.ready.get("optimizer"),
        "attention": w.ready.get("attention"),
        "cache_dir": w.ready["cache_dir"],
        "peak_mem_mb": ws[-1]["peak_mem_mb"],
        "max_rss_mb": ws[-1]["max_rss_mb"],
        "cpu_per_wall": statistics.median(r["cpu_per_wall"] for r in ws),
    }


def run_benchmark(
    configs: list[dict[str, Any]] | None = None,
    steps: int = 3,
    warmup: int = 2,
    windows: int = 4,
    json_path: str | Path | None = None,
    impls: tuple[str, ...] | list[str] = IMPLS,
    show: bool = True,
    peak_flops: float | None = None,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Benchmark each config with each implementation; one result dict per (config, implementation, dtype).
    Each worker runs one warm-up window (discarded) and `windows` measured ones; tokens/s is their median.
    `dtype` bfloat16 adds bfloat16 rows beside the float32 ones (precision_rows.worker_specs)."""
    if windows < 1 or steps < 1:
        raise MlxllmError(f"--windows and --steps must be at least 1 (got {windows} and {steps}).")
    configs = [dict(c) for c in (configs or DEFAULT_CONFIGS)]
    skip = torch_available()
    notes = []
    impls = list(impls)
    if skip and any(i.startswith("torch") for i in impls):
        notes.append(f"PyTorch skipped: {skip}")
        impls = [i for i in impls if not i.startswith("torch")]
    specs = worker_specs(impls, dtype)
    notes += [n for n in [untwinned_note(impls, dtype)] if n]
    peaks = [measure_peak()]  # measured before, between and after the configs; the best is the peak
    results: list[dict[str, Any]] = []
    for i, cfg in enumerate(configs):
        cfg["hidden_dim"] = model_config(cfg).hidden_dim  # the PyTorch workers never import mlxllm
        workers, rounds = _bench_config(cfg, specs, steps, warmup, windows, offset=i)
        peaks.append(measure_peak())
        peak = peak_flops or max(max(peaks), _theoretical_peak())
        exec_flops = {d: _executed_flops(cfg, workers, d) for d in {w.dtype for w in workers}}
        results += [_row(cfg, w, rounds[w.name], peak, peaks, exec_flops[w.dtype]) for w in workers]
    add_eager_ratios(results)
    if show:
        print_table(results, notes)
    if json_path:
        from mlxllm.cpu import blas
        from mlxllm.device import cpu_facts

        Path(json_path).write_text(
            json.dumps(
                {
                    "results": results,
                    "notes": notes,
                    "peak_flops_runs": peaks,
                    "cpu": cpu_facts(),
                    "blas": blas.describe(),
                },
                indent=1,
            )
        )
    return results


def memory_check(cfg: dict[str, Any], checkpoints: tuple[int, ...] = (100, 1000), show: bool = True) -> dict[str, Any]:
    """Peak memory of mlxllm's compiled step after each step count in `checkpoints`, in one run."""
    w = Worker("mlxllm", cfg, 1)
    try:
        w.wait_ready()
        done, out = 1, {}
        for n in checkpoints:
            r = w.window(n - done)
            done = n
            out[n] = {
                "peak_mem_mb": r["peak_mem_mb"],
                "active_mem_mb": r["active_mem_mb"],
                "max_rss_mb": r["max_rss_mb"],
            }
    finally:
        w.close()
    first, last = out[checkpoints[0]], out[checkpoints[-1]]
    growth = last["peak_mem_mb"] / first["peak_mem_mb"] - 1
    result = {"config": cfg["name"], "after": out, "peak_growth": growth, "steady": abs(growth) <= 0.05}
    if show:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"Memory over one run of mlxllm's compiled step ({cfg['name']})")
        for c in ("after step", "peak MB (MLX)", "active MB", "max RSS MB"):
            t.add_column(c, justify="right")
        for n, m in out.items():
            t.add_row(f"{n:,}", f"{m['peak_mem_mb']:.1f}", f"{m['active_mem_mb']:.1f}", f"{m['max_rss_mb']:.1f}")
        Console().print(t)
        Console().print(
            f"peak growth from step {checkpoints[0]} to {checkpoints[-1]}: {growth:+.2%} "
            f"({'steady' if result['steady'] else 'GROWING'})"
        )
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        action="append",
        choices=[c["name"] for c in DEFAULT_CONFIGS] + ["tiny"],
        help="which config(s) to run (default: all defaults)",
    )
    p.add_argument("--impl", action="append", choices=IMPLS, help="which implementation(s) (default: all)")
    p.add_argument("--steps", type=int, default=3, help="steps per window")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (the first one compiles)")
    p.add_argument(
        "--windows",
        type=int,
        default=4,
        help="measured windows per implementation, after one discarded warm-up window (median reported)",
    )
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=None,
        help="use this matmul peak for MFU instead of measuring it (e.g. one taken on a quiet machine)",
    )
    p.add_argument(
        "--attention", choices=("auto", "fast", "halves", "reference"), default=None, help="override model.attention"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="bfloat16: also mlxllm with train.dtype = bfloat16 and PyTorch with bfloat16 autocast, beside float32",
    )
    p.add_argument("--json", dest="json_path", help="write the results here")
    p.add_argument(
        "--memory-check",
        nargs="?",
        const="100,1000",
        metavar="STEPS",
        help="instead: peak memory of mlxllm's compiled step after each of these steps (default 100,1000)",
    )
    a = p.parse_args(argv)
    by_name = {c["name"]: c for c in [*DEFAULT_CONFIGS, TINY_CONFIG]}
    configs = [dict(by_name[n]) for n in a.config] if a.config else [dict(c) for c in DEFAULT_CONFIGS]
    if a.attention:
        for c in configs:
            c["attention"] = a.attention
    if a.memory_check:
        steps = tuple(int(s) for s in a.memory_check.split(","))
        res = [memory_check(c, steps) for c in configs]
        if a.json_path:
            Path(a.json_path).write_text(json.dumps(res, indent=1))
        return
    run_benchmark(
        configs,
        steps=a.steps,
        warmup=a.warmup,
        windows=a.windows,
        json_path=a.json_path,
        impls=tuple(a.impl) if a.impl else IMPLS,
        peak_flops=a.peak_gflops * 1e9 if a.peak_gflops else None,
        dtype=a.dtype,
    )


if __name__ == "__main__":
    main()
