"""Data-parallel training speed: tokens/s of `mlxllm train` in 1 and N processes (mlx.launch, ring
backend on 127.0.0.1), the measured all-reduce time of one step's gradients, and what that
all-reduce would cost over Thunderbolt 5 and 10 GbE.

    python benchmarks/data_parallel.py                       # d256 and d512, 1 and 2 processes
    python benchmarks/data_parallel.py --config d256 --processes 1,2,4 --steps 60
    python benchmarks/data_parallel.py --launcher mlx.launch     # the same, started by mlx.launch

The estimate: a ring all-reduce sends and receives 2 (N - 1) / N times the gradient bytes per
process, so its time is  params x bytes_per_value x 2 (N - 1) / N / link_bandwidth  (plus latency,
small at these sizes). Gradients are fp32 (4 bytes) unless train.allreduce_dtype = bfloat16 (2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # the shapes of `mlxllm bench train`
    "d256": dict(n_layers=4, d_model=256, n_heads=4),
    "d512": dict(n_layers=4, d_model=512, n_heads=8),
}
LINKS = {"Thunderbolt 5 (80 Gb/s)": 80e9 / 8, "10 GbE": 10e9 / 8}
SEQ_LEN, BATCH = 256, 16


def ring_seconds(params: int, processes: int, bandwidth: float, bytes_per_value: int = 4) -> float:
    """Time of a bandwidth-bound ring all-reduce of the gradients."""
    return params * bytes_per_value * 2 * (processes - 1) / processes / bandwidth


def _worker(config: str, steps: int, out_dir: str, corpus: str | None) -> None:
    """One process of the group: train, then time an all-reduce of the gradients' size."""
    import mlxllm  # first: it loads the optimized BLAS before mlx.core
    from mlxllm.distributed import group

    import mlx.core as mx

    g = group()
    model = mlxllm.ModelConfig(vocab_size=257, max_seq_len=SEQ_LEN, **CONFIGS[config])
    train = mlxllm.TrainConfig(
        data=corpus,
        out_dir=out_dir,
        batch_size=BATCH,
        max_steps=steps,
        eval_interval=steps,
        eval_batches=2,
        log_interval=10,
        sample_tokens=0,
        warmup_steps=10,
    )
    mlxllm.train(model, train, mlxllm.TokenizerConfig(kind="byte"), show_progress=False, overwrite=True)
    reduce_ms = None
    if g.size > 1:
        flat = mx.zeros((model.num_params(),), dtype=mx.float32)
        times = []
        for i in range(12):
            start = time.perf_counter()
            mx.eval(g.sum(flat))
            if i >= 2:
                times.append((time.perf_counter() - start) * 1e3)
        reduce_ms = statistics.median(times)
    if g.primary:
        rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
        windows = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][1:]  # the first holds compilation
        print(
            "RESULT "
            + json.dumps(
                {"tokens_per_sec": statistics.median(windows), "params": model.num_params(), "reduce_ms": reduce_ms}
            ),
            flush=True,
        )


def _free_port(n: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1] if s.getsockname()[1] + n < 65536 else 30000


def _commands(cmd: list[str], processes: int, launcher: str, out: str) -> list[tuple[list[str], dict[str, str]]]:
    """The processes to start: one; mlx.launch's; or the group started as mlx.launch starts it (MLX_RANK and
    a ring hostfile on 127.0.0.1), without mlx.launch's loop that forwards input and output, which polls
    and keeps cores busy that the training needs on a small machine."""
    if processes == 1:
        return [(cmd, dict(os.environ))]
    port = _free_port(processes)
    if launcher == "mlx.launch":
        launch = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
        return [([launch, "-n", str(processes), "--starting-port", str(port), "--", *cmd], dict(os.environ))]
    hostfile = Path(out + ".hosts.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + i}"] for i in range(processes)]))
    return [(cmd, {**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}) for r in range(processes)]


def _measure(config: str, processes: int, steps: int, corpus: str | None, launcher: str) -> dict:
    out = tempfile.mkdtemp(prefix=f"dp-{config}-{processes}-")
    me = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        config,
        "--steps",
        str(steps),
        "--out",
        out,
        *(["--corpus", corpus] if corpus else []),
    ]
    # mlx.launch forwards its input to the processes: at end of file (a closed or /dev/null stdin) its
    # loop spins a core, so it gets a pipe that stays open and empty.
    quiet_in, keep_open = os.pipe()
    try:
        procs = [
            subprocess.Popen(c, env=env, stdin=quiet_in, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for c, env in _commands(me, processes, launcher, out)
        ]
        outputs = [p.communicate(timeout=1800) for p in procs]
    finally:
        os.close(quiet_in), os.close(keep_open)
    shutil.rmtree(out, ignore_errors=True)
    lines = [line for stdout, _ in outputs for line in stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(f"{' '.join(me)} printed no result:\n" + "\n".join(o + e for o, e in outputs))
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", choices=list(CONFIGS), help="Model shape (repeatable; default: all).")
    p.add_argument("--processes", default="1,2", help="Comma-separated process counts.")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--corpus", help="Text to train on (default: the built-in corpus).")
    p.add_argument(
        "--launcher",
        choices=["direct", "mlx.launch"],
        default="direct",
        help="Start the group as mlx.launch does but without it (direct), or with mlx.launch.",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return _worker(a.worker, a.steps, a.out, a.corpus)

    from mlxllm.device import describe_cpu

    counts = [int(n) for n in a.processes.split(",")]
    print(f"CPU: {describe_cpu()}; {a.steps} steps of {BATCH} x {SEQ_LEN} tokens (global batch), byte tokens")
    print(f"command: {' '.join(sys.argv)}; launcher {a.launcher}")
    head = [
        "config",
        "params",
        "processes",
        "tokens/s",
        "step ms",
        "all-reduce ms (here)",
        *(f"all-reduce ms, {name}" for name in LINKS),
    ]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for config in a.config or list(CONFIGS):
        for n in counts:
            r = _measure(config, n, a.steps, a.corpus, a.launcher)
            step_ms = BATCH * SEQ_LEN / r["tokens_per_sec"] * 1e3
            here = f"{r['reduce_ms']:.1f}" if r["reduce_ms"] is not None else "-"
            paper = [f"{ring_seconds(r['params'], n, bw) * 1e3:.2f}" if n > 1 else "-" for bw in LINKS.values()]
            print(
                f"| {config} | {r['params'] / 1e6:.2f}M | {n} | {r['tokens_per_sec']:,.0f} | {step_ms:.0f} | {here} | "
                + " | ".join(paper)
                + " |",
                flush=True,
            )


if __name__ == "__main__":
    main()
