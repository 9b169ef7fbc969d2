"""bfloat16 against float32 (issue 24): does a run that really computes in bfloat16 end where the float32 run of
the same config ends, within seed noise?

    python benchmarks/precision_parity.py [CORPUS] [--quick] [--seeds 2] [--keep DIR | --report DIR]

One config, byte tokens: 2 layers x 128 (4 heads), context 128, batch 16, the default learning rate and
schedule, trained for exactly 300 optimizer steps in float32 and in bfloat16 with each of --seeds seeds
(train.seed: the initial weights and the batch order). The validation loss is measured once, at the end, on the
whole validation split (every full batch of non-overlapping windows from its start, data.eval_batches), the
same windows for every run, so the evaluation's sampling is common to all runs and the gap between them is the
training's. Each run evaluates in its own compute dtype, as the trainer does.

Real bfloat16: on the CPU, mlxllm.cpu.precision.compute_dtype keeps train.dtype = "bfloat16" where oneDNN's
bfloat16 matmul is chosen (cpu/bf16matmul.py: built and measured faster than float32), and the bfloat16 runs
take that path, the one a user's bfloat16 run takes (its products rounded to bfloat16 and summed in float32,
the rest float32, as autocast does). Elsewhere compute_dtype turns it into float32 compute unless
MLXLLM_CPU_BF16=1, which keeps MLX's own CPU bfloat16 path (slow, but the numerics of a Metal bfloat16 run):
there the bfloat16 runs set it for the length of their train() only (open_run reads it once, at the start) and
put the environment back after. The path the bfloat16 rows took is printed under the table. The table's
"computed" column is what the trainer really ran in: train.dtype in the run directory's config.toml, written
after compute_dtype. It is mixed precision, as the code has it: the model is built in float32 and the
optimizer (AdamW) initialised on those weights (runstate._model); each step casts the float32 master weights
to the compute dtype inside the loss (step.make_step's _cast; on oneDNN's path they stay float32 and only the
matrix products round), so the gradients come back float32, are clipped in float32 and update float32
weights and AdamW moments. The "weights / AdamW" column reads this from the run's checkpoint: the floating
dtypes of model.safetensors and of optimizer.safetensors.

Printed: per run, the dtype asked for and the one computed, the seed, the final validation loss and the
training tokens/s (the median logged window, the first, which compiles, left out); then the seed noise (the
pooled sd of each dtype's seeds: the root mean square of the per-dtype sds), the gap between the dtype means,
the gap of each seed's pair (the same initial weights and batches in both dtypes, so the pair differs by the
precision alone: a sharper figure than the gap of the means where seeds scatter widely), and PASS or MISS for
|gap| <= 2 x seed noise (MISS too where a bfloat16 row did not compute in bfloat16). With two seeds the noise
is itself a rough figure; --seeds 3 or more firms it up.

--keep DIR keeps the runs and DIR/results.json, written after each run; a rerun with the same DIR (same
corpus, --quick and machine) reports the runs it holds without training them again. --report DIR prints the
table of DIR/results.json, training nothing. --quick: a 2 x 64 model, context 64, batch 8, 40 steps, a smoke
test of seconds. The full benchmark takes about 8 minutes on a 2-core CPU, nearly all of it the bfloat16
runs. Only the losses are the benchmark's figures: tokens/s moves with other work on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlxllm  # noqa: F401 - loads the optimized BLAS before mlx.core
from mlxllm import checkpoint as ckpt
from mlxllm.config import ModelConfig, RunConfig, TokenizerConfig, TrainConfig
from mlxllm.cpu import bf16matmul
from mlxllm.cpu.precision import FORCE_ENV, SLOW
from mlxllm.device import describe_cpu, device_name
from mlxllm.errors import MlxllmError
from mlxllm.trainer import train

import mlx.core as mx
import tomllib

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
DTYPES = ("float32", "bfloat16")
ALL_BATCHES = 1_000_000  # eval_batches: data.eval_batches takes every full batch the validation split holds

FULL = dict(
    model=ModelConfig(n_layers=2, d_model=128, n_heads=4, max_seq_len=128),
    batch=16,
    steps=300,
    eval_batches=ALL_BATCHES,
    log_interval=25,
)
QUICK = dict(
    model=ModelConfig(n_layers=2, d_model=64, n_heads=4, max_seq_len=64),
    batch=8,
    steps=40,
    eval_batches=4,
    log_interval=5,
)


@contextlib.contextmanager
def real_dtype(dtype: str) -> Iterator[None]:
    """While open, a run asking for `dtype` computes in it on the CPU too (MLXLLM_CPU_BF16=1 for bfloat16 and
    float16); the variable is put back as it was after."""
    before = os.environ.get(FORCE_ENV)
    if dtype in SLOW:
        os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def bf16_path() -> str:
    """The path a bfloat16 run takes on this CPU: oneDNN's bfloat16 matmul where compute_dtype keeps bfloat16
    through it, else MLX's own bfloat16 (forced by real_dtype)."""
    if mx.default_device() == mx.cpu and os.environ.get(FORCE_ENV, "") != "1" and bf16matmul.choose()[0]:
        return "oneDNN"
    return "MLX"


def run_config(corpus: Path, size: dict, dtype: str, seed: int, out: Path) -> RunConfig:
    """The benchmark's one config (FULL or QUICK as `size`) in `dtype` with `seed`, its run directory `out`;
    evaluated once, after its last step."""
    return RunConfig(
        model=size["model"],
        tokenizer=TokenizerConfig(kind="byte"),
        train=TrainConfig(
            data=str(corpus),
            out_dir=str(out),
            batch_size=size["batch"],
            dtype=dtype,
            seed=seed,
            max_steps=size["steps"],
            eval_interval=size["steps"],
            eval_batches=size["eval_batches"],
            log_interval=size["log_interval"],
            keep_last=1,
            sample_tokens=0,
        ),
    )


def _float_dtypes(path: Path) -> str:
    """The floating dtypes of a safetensors file's arrays, e.g. 'float32'."""
    names = {str(a.dtype).removeprefix("mlx.core.") for a in mx.load(str(path)).values()}
    return "+".join(sorted(n for n in names if n.startswith(("float", "bfloat"))))


def train_one(run: RunConfig) -> dict[str, Any]:
    """Train `run` (its dtype really computed, real_dtype) and return its figures: the dtype asked for and the one
    the trainer computed in, the seed, the final validation loss, steps, training tokens/s and the dtypes of the
    weights and AdamW state it saved."""
    asked = run.train.dtype
    path = bf16_path() if asked == "bfloat16" else None
    with real_dtype(asked) if path != "oneDNN" else contextlib.nullcontext():
        r = train(run, overwrite=True, show_progress=False)
    settings = tomllib.loads((r.run_dir / "config.toml").read_text())
    logs = [x for x in map(json.loads, (r.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    speeds = [x["tokens_per_sec"] for x in logs[1:]] or [r.tokens / r.elapsed]
    last = ckpt.latest_checkpoint(r.run_dir)
    return {
        "dtype": asked,
        "computed": settings["train"]["dtype"],
        "seed": run.train.seed,
        "val_loss": float(r.val_loss),
        "steps": r.step,
        "tokens_per_s": statistics.median(speeds),
        "seconds": r.elapsed,
        "weights": _float_dtypes(last / "model.safetensors"),
        "adamw": _float_dtypes(last / "optimizer.safetensors"),
        **({"path": path} if path else {}),
    }


class Ledger:
    """The benchmark's runs, results.json in its directory, written whole after each run."""

    def __init__(self, path: Path, header: dict[str, Any]):
        """path: the results.json; header: what every run depends on, which a kept one must match."""
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"header": header}
        if self.data["header"] != header:
            raise SystemExit(
                f"{path} holds a benchmark of {self.data['header']}, not of {header}: its figures would mix. "
                "Keep this one in another directory, or rerun that one's command."
            )

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)  # whole or not at all, should the benchmark be stopped while it writes


def verdict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The dtype means, the seed noise (pooled sd over the dtypes' seeds), the gap (bfloat16 - float32) and
    whether |gap| <= 2 x noise with every bfloat16 run computed in bfloat16."""
    losses = {d: [r["val_loss"] for r in runs if r["dtype"] == d] for d in DTYPES}
    if any(len(v) < 2 for v in losses.values()):
        return {"complete": False}
    means = {d: statistics.mean(v) for d, v in losses.items()}
    noise = math.sqrt(statistics.mean(statistics.variance(v) for v in losses.values()))
    gap = means["bfloat16"] - means["float32"]
    real = all(r["computed"] == r["dtype"] for r in runs)
    return {"complete": True, "means": means, "noise": noise, "gap": gap, "real": real,
            "pass": real and abs(gap) <= 2 * noise}  # fmt: skip


def show(data: dict[str, Any], commands: bool = False) -> None:
    """The table of a results.json, with its verdict; with `commands`, first the command lines that made it."""
    h = data["header"]
    for when, c in data.get("commands", {}).items() if commands else ():
        print(f"{when}: {c['command']}\n  machine: {c['machine']}")
    runs = sorted(data.get("runs", {}).values(), key=lambda r: (DTYPES.index(r["dtype"]), r["seed"]))
    print(f"\n{h['config']}; {h['steps']} steps; corpus {h['corpus']}")
    print(f"{'asked':<9} {'computed':<9} {'seed':>4} {'val loss':>9} {'tokens/s':>9}  weights / AdamW")
    for r in runs:
        print(
            f"{r['dtype']:<9} {r['computed']:<9} {r['seed']:>4} {r['val_loss']:>9.4f} {r['tokens_per_s']:>9,.0f}  "
            f"{r['weights']} / {r['adamw']}"
        )
    v = verdict(runs)
    if not v["complete"]:
        print("(each dtype needs two seeds for a verdict)")
        return
    paths = sorted({r.get("path", "MLX") for r in runs if r["dtype"] == "bfloat16"})
    names = {"oneDNN": "oneDNN's bfloat16 matmul (mlxllm's extension)", "MLX": f"MLX's own bfloat16 ({FORCE_ENV}=1)"}
    print(f"bfloat16 rows computed through {' and '.join(names[p] for p in paths)}")
    m = v["means"]
    print(f"means: float32 {m['float32']:.4f}, bfloat16 {m['bfloat16']:.4f}")
    print(f"seed noise (pooled sd of each dtype's {len(runs) // 2} seeds): {v['noise']:.4f}")
    print(f"gap (bfloat16 - float32): {v['gap']:+.4f}")
    paired = {r["seed"]: r["val_loss"] for r in runs if r["dtype"] == "float32"}
    pairs = [
        f"seed {r['seed']} {r['val_loss'] - paired[r['seed']]:+.4f}"
        for r in runs
        if r["dtype"] == "bfloat16" and r["seed"] in paired
    ]
    print(f"paired by seed (the same initial weights and batches), bfloat16 - float32: {', '.join(pairs)}")
    if not v["real"]:
        print(f"MISS: a bfloat16 row computed in float32, so this measured no bfloat16 (is {FORCE_ENV} honoured?)")
    else:
        print(
            f"{'PASS' if v['pass'] else 'MISS'}: |gap| {abs(v['gap']):.4f} "
            f"{'<=' if v['pass'] else '>'} 2 x seed noise {2 * v['noise']:.4f}"
        )


def run_benchmark(ledger: Ledger, corpus: Path, size: dict, seeds: int, root: Path) -> None:
    """Each dtype with each seed, float32 first, unless the ledger holds it."""
    for dtype in DTYPES:
        for seed in range(seeds):
            key = f"{dtype}/{seed}"
            if key in ledger.data.get("runs", {}):
                print(f"  {key}: kept in {ledger.path}", flush=True)
                continue
            r = train_one(run_config(corpus, size, dtype, seed, root / "runs" / f"{dtype}-seed{seed}"))
            ledger.put("runs", key, r)
            print(
                f"  {key}: computed in {r['computed']}, val loss {r['val_loss']:.4f} after {r['steps']} steps, "
                f"{r['seconds']:.0f} s",
                flush=True,
            )


def header(corpus: Path, size: dict, quick: bool, machine: str) -> dict[str, Any]:
    m = size["model"]
    return {
        "corpus": str(corpus.resolve()),
        "quick": quick,
        "steps": size["steps"],
        "config": f"{m.n_layers} x {m.d_model} ({m.n_heads} heads), context {m.max_seq_len}, batch {size['batch']}",
        "eval_batches": size["eval_batches"],
        "machine": machine,
    }


def main(argv: list[str] | None = None) -> None:
    """The benchmark's command line (argv: its arguments; None: sys.argv's)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "corpus", nargs="?", type=Path, default=DEFAULT_CORPUS, help="text corpus (default: Tiny Shakespeare)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: 2 x 64, context 64, 40 steps")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per dtype (at least 2)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs and results.json here")
    parser.add_argument("--report", type=Path, default=None, help="print the table of a kept DIR, training nothing")
    args = parser.parse_args(argv)
    if args.report is not None:
        if not (args.report / "results.json").is_file():
            parser.error(f"{args.report / 'results.json'} not found: --report takes the DIR a run kept with --keep DIR")
        return show(json.loads((args.report / "results.json").read_text()), commands=True)
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found; pass a text file")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the seed noise is the verdict's yardstick")
    size, machine = QUICK if args.quick else FULL, f"{describe_cpu()}; MLX {device_name()}"
    start = time.perf_counter()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="parity_") as tmp:
        ledger = Ledger(Path(tmp) / "results.json", header(args.corpus, size, args.quick, machine))
        command = {"command": shlex.join(["python", *(sys.argv if argv is None else ["precision_parity.py", *argv])])}
        ledger.put("commands", time.strftime("%Y-%m-%d %H:%M:%S"), {**command, "machine": machine})
        print(f"{command['command']}\nmachine: {machine}", flush=True)
        run_benchmark(ledger, args.corpus, size, args.seeds, Path(tmp))
        show(ledger.data)
    print(f"benchmark wall clock {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except MlxllmError as e:  # bad input: its one paragraph, not a traceback
        raise SystemExit(str(e)) from None
