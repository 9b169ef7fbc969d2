"""The search plans the run (issue 23): given a tenth of the target's time, does the new search pick the config
to train for T, and can its predictions, for that config and for any other, be trusted?

    python benchmarks/search_plan.py [CORPUS] [--quick] [--target-seconds T] [--seeds 2] [--oracle 5]
        [--keep DIR | --report DIR]

Byte tokens, context 128, batch 16, as configs/search/shakespeare-target.toml; the target T is 600 s of training
on this machine; each search gets S = T/10 of wall clock. Trained for T, with --seeds training seeds each:
  (a) the default: ModelConfig() and TrainConfig() (learning rate included) on that context and batch;
  (b) the tokens-per-parameter rule: the largest architecture of the space whose tokens at T on this machine
      are at least 20x its parameters, at the default learning rate. Its tokens at T are its training
      tokens/s times T (the median step of a few seconds of training, the first step left out; evaluations
      and checkpoints, every 200 steps, take a few % of T on top), measured for every architecture of a grid
      over the space (every layer count, head size and head count; mlp_ratio at its range's ends and the
      default's); results.json keeps every speed;
  (c) the pick of today's target-aware search ([target] planner = "curves") given S;
  (d) the pick of the new search ([target] planner = "fit") given S;
and the oracle (e): --oracle more architectures of the grid, nearest to sizes log-spaced over its parameter
counts (the smallest and the largest among them), one seed each. The space runs from 1 x 128 (0.2M parameters)
to 6 x 384 (11.6M) and holds the default 4 x 256, every search's trial 0; the learning rate is not searched.
Printed: the loss at T per config and seed; the seed noise (search_target's: the mean sd over the configs with
several seeds); the oracle's best (the lowest mean over every architecture trained for T, (a)-(e)); (d)'s
forecast for each of those architectures, with Kendall tau against the measured means and the calibration (the
share of all measured losses, every seed, within 2 predicted sd); today's own predictions the same way, for
the architectures its trials saw; (d)'s picks and predictions for T/4, T/2, 2T and 4T; the issue's goals, each
PASS or MISS with its figures: (d) within 2x seed noise of the oracle's best, better than (a) and (b) by more
than 2x the seed noise, not worse than (c) (by no more than 2x the seed noise, which cannot tell them apart),
tau >= 0.7, calibration >= 80%.

With --keep DIR the searches, runs and results.json stay in DIR, results.json written after each measurement;
a rerun with --keep DIR skips what it records (same corpus, T, S and --quick; a search cut off starts again,
as resumed it would get more than S), so the benchmark may be stopped and resumed. A committed results.json
copied into an empty DIR runs both searches again and retrains only the configs whose pick changed: the way to
measure a change to one search against the same baselines. --report DIR prints the
tables again from DIR/results.json, training nothing. The full benchmark takes about 2.5 h on a 2-core CPU (72
speed measurements, two 60 s searches, 13 runs of 10 minutes); --target-seconds 1800 (S = 180 s) about 7 h.
--quick, a smoke test of about 12 minutes, has a 9-architecture space of tiny models, T = 60 s and S = 20 s
(T/3, not T/10: with T/10 today's search refuses a budget whose longest rung is under a second) and 3 oracle
architectures. Timings, and so every figure, move with other work on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mlxllm import data as data_mod
from mlxllm.config import ModelConfig, RunConfig, from_dict, load_config
from mlxllm.device import describe_cpu, device_name
from mlxllm.errors import MlxllmError
from mlxllm.tokenizer import ByteTokenizer
from mlxllm.trainer import train

import optuna
from mlxllm_search import search
from mlxllm_search.space import Choice, Space
from mlxllm_search.spec import TARGET_KEYS, parse_spec, with_target
from mlxllm_search.storage import open_storage
from mlxllm_search.target import HUGE_STEPS
from search_plan_tables import A, B, C, D, rule_pick, shape, show_results
from search_target import DEFAULT_CORPUS, FULL, QUICK, for_target, predicted_before_target, spec_dict, train_result

PLAN = dict(
    FULL,
    target=600.0,
    search_fraction=0.1,
    oracle=5,
    speed_seconds=4.0,
    final_eval_interval=200,  # an evaluation and checkpoint take a few % of T, not the 0.2M model's tenth
    space={
        "n_layers": {"min": 1, "max": 6},
        "head_dim": [32, 64],
        "n_heads": [4, 6],
        "kv_group": [1],
        "mlp_ratio": {"min": 2.0, "max": 3.0},
    },
)
PLAN_QUICK = dict(
    QUICK,
    target=60.0,
    search_fraction=1 / 3,
    oracle=3,
    speed_seconds=1.5,
    final_eval_interval=1000,
    space={"n_layers": [1, 2, 3], "head_dim": [16], "n_heads": [1, 2, 4], "kv_group": [1], "mlp_ratio": [2.0]},
)
NO_PLAN = (
    "(d) needs the new search (issue 23): [target] planner in the search spec and mlxllm_search.forecast, which "
    "this tree does not have yet. (a), (b), (c) and (e) are measured{where}; once it has them, run the same command "
    "again with --keep DIR on that directory and only (d) will run."
)


# The adapters: every call into the new search (issue 23) is in one of these four functions.


def planned_spec(corpus: Path, size: dict, target: float, planner: str) -> dict:
    """The target-aware search's spec (search_target's) with [target] planner = `planner`: "fit" (the new
    search) or "curves" (today's)."""
    d = spec_dict(corpus, size, target)
    if planner != "curves" or "planner" in TARGET_KEYS:  # a search without planners knows only its curves
        d["target"]["planner"] = planner
    return d


def plan_search_ready() -> bool:
    """Whether this tree has the new search: the spec's planner key and the forecast module. (The module alone
    does not tell: an editable install may find one in another checkout.)"""
    return "planner" in TARGET_KEYS and importlib.util.find_spec("mlxllm_search.forecast") is not None


def plan_prediction(search_dir: Path, model: ModelConfig) -> tuple[float, float] | None:
    """The new search's forecast of the validation loss at T for `model` (mean, sd), from its plan.json;
    None where it makes none (a plan without a fit)."""
    from mlxllm_search import forecast

    record = json.loads((search_dir / "plan.json").read_text())
    if record["law"] is None:
        return None
    vocab = record["predictions"][0]["model"]["vocab_size"]  # the corpus' tokenizer, as the search built it
    return forecast.predict_loss(record, replace(model, vocab_size=model.vocab_size or vocab))


def plan_horizons(search_dir: Path, target: float) -> list[dict[str, Any]]:
    """The new search's picks for T/4, T/2, T, 2T and 4T from its plan.json: for each, the run's seconds, the
    pick's model (a ModelConfig table), its predicted mean and sd, and whether that is an extrapolation."""
    record = json.loads((search_dir / "plan.json").read_text())
    return [
        {
            "seconds": p["multiple"] * target,
            "model": p["model"],
            "mean": p["loss"],
            "sd": p["sd"],
            "extrapolated": bool(p["extrapolation"]),
        }
        for p in record["picks"]
    ]


class Ledger:
    """The benchmark's figures, results.json in its directory, written whole after each one is added."""

    def __init__(self, path: Path, header: dict[str, Any]):
        """path: the results.json; header: what every figure depends on (corpus, T, S, quick), which a kept one
        must match."""
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"header": header}
        if self.data["header"] != header:
            raise SystemExit(
                f"{path} holds a benchmark of {self.data['header']}, not of {header}: its figures would mix. "
                "Keep this one in another directory, or rerun that one's command."
            )

    def get(self, section: str, key: str) -> Any:
        return self.data.get(section, {}).get(key)

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)  # whole or not at all, should the benchmark be stopped while it writes


@dataclass(frozen=True)
class Bench:
    ledger: Ledger
    size: dict  # PLAN or PLAN_QUICK
    corpus: Path
    T: float  # the target: seconds of training
    S: float  # each search's own seconds
    root: Path  # where the searches, runs and results.json go
    corpus_tokens: int  # training tokens of the corpus, for the epochs each run makes
    kept: bool  # root is --keep DIR (else a temporary folder)


def params(model: ModelConfig) -> int:
    return replace(model, vocab_size=ByteTokenizer.vocab_size).num_params()


def name(model: ModelConfig, lr: float) -> str:
    """A config in the tables and results.json: layers x d_model, heads/KV heads, FFN width, learning rate."""
    return f"{shape(model)} lr{lr:.3g}"


def slug(key: str) -> str:
    return re.sub(r"[^\w.-]+", "_", key).strip("_")


def grid(spec: Any) -> list[ModelConfig]:
    """The space's architectures by size: every layer count, head size and head count; mlp_ratio's choices, or
    its range's ends and the base's ratio."""
    s, base, r = spec.space, spec.base.model, spec.space.mlp_ratio
    if r is None or isinstance(r, Choice):
        ratios = [base.mlp_ratio] if r is None else r.candidates()
    else:
        ratios = sorted({r.low, r.high, *([base.mlp_ratio] if r.contains(base.mlp_ratio) else [])})
    out: dict[str, ModelConfig] = {}
    for n, hd, nh, ratio in itertools.product(
        s.n_layers.candidates(), s.head_dim.candidates(), s.n_heads.candidates(), ratios
    ):
        for g in s.kv_groups(nh):
            m = Space.build(base, n, hd, nh, g, ratio)
            out.setdefault(shape(m), m)
    return sorted(out.values(), key=params)


def speed(run: RunConfig, seconds: float, out: Path) -> float:
    """Tokens/s of `seconds` of training logged every step: the median step's, the first left out (it compiles),
    so that a stall from other work on the machine does not count; a run that ends within three steps (a large
    model, or a first step slowed by other work) is made 4x longer."""
    for _ in range(3):
        r = for_target(run, seconds, 0, HUGE_STEPS, out)
        result = train(
            replace(r, train=replace(r.train, log_interval=1, eval_batches=1)), overwrite=True, show_progress=False
        )
        logs = [x for x in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
        shutil.rmtree(result.run_dir)  # its checkpoint, up to ~0.2 GB, is of no use
        if len(logs) >= 3:
            return statistics.median(x["tokens_per_sec"] for x in logs[1:])
        seconds *= 4
    return result.tokens / result.elapsed


def measure_speeds(b: Bench, spec: Any) -> dict[str, dict]:
    for m in grid(spec):
        if b.ledger.get("speeds", shape(m)) is None:
            tps = speed(replace(spec.base, model=m), b.size["speed_seconds"], b.root / "speed" / slug(shape(m)))
            b.ledger.put("speeds", shape(m), {"model": asdict(m), "params": params(m), "tokens_per_s": tps})
            print(
                f"  speed {shape(m)}: {tps:,.0f} tokens/s, {params(m) / 1e6:.2f}M parameters, "
                f"{tps * b.T / params(m):.1f} tokens per parameter at T",
                flush=True,
            )
    return b.ledger.data["speeds"]


def oracle_models(models: list[ModelConfig], n: int, taken: set[str]) -> list[ModelConfig]:
    """n architectures of `models` (sorted by size) not `taken`, each nearest in log parameters to one of n sizes
    log-spaced from the smallest to the largest."""
    free, out = [m for m in models if shape(m) not in taken], []
    lo, hi = math.log(params(models[0])), math.log(params(models[-1]))
    for i in range(min(n, len(free))):
        goal = lo + (hi - lo) * i / max(1, n - 1)
        out.append(min((m for m in free if m not in out), key=lambda m: abs(math.log(params(m)) - goal)))
    return out


def at_target(b: Bench, label: str, run: RunConfig, seeds: int) -> None:
    """`run` trained for T with each seed, unless the ledger has it."""
    for seed in range(seeds):
        key = f"{label}/{seed}"
        kept = b.ledger.get("runs", key)
        # A kept run counts only for the config it trained: a search run again may pick another.
        if kept is not None and kept["name"] == name(run.model, run.train.learning_rate):
            continue
        r = train_result(run, b.T, seed, b.size["final_eval_interval"], b.root / "runs" / slug(key))
        b.ledger.put(
            "runs",
            key,
            {
                "label": label,
                "seed": seed,
                "name": name(run.model, run.train.learning_rate),
                "model": asdict(run.model),
                "params": params(run.model),
                "val_loss": float(r.val_loss),
                "steps": r.step,
                "tokens": r.tokens,
                "seconds": r.elapsed,
                "epochs": r.tokens / b.corpus_tokens,
            },
        )
        print(
            f"  {key}: {name(run.model, run.train.learning_rate)}: {r.val_loss:.4f} after {r.step:,} steps", flush=True
        )


def searched(b: Bench, planner: str) -> Path:
    """The search with `planner` given S, once: its directory."""
    out = b.root / planner
    # A ledger copied without its search's folder (results.json alone is committed) runs that search again.
    if b.ledger.get("searches", planner) is None or not (out / "best.toml").is_file():
        shutil.rmtree(out, ignore_errors=True)  # one cut off starts again: resumed, it would get more than S
        spec = parse_spec(planned_spec(b.corpus, b.size, b.T, planner))
        r = search(spec, out=out, seed=0, show=False, search_seconds=b.S)
        if r.best_config is None:
            raise SystemExit(f"The {planner} search finished no trial in {b.S:g} s, so it has no pick: raise T.")
        b.ledger.put("searches", planner, {"trials": len(r.study.trials), "seconds": r.seconds})
        print(f"  {planner} search: {len(r.study.trials)} trials in {r.seconds:.0f} s", flush=True)
    return out


def curves_predictions(search_dir: Path, names: set[str]) -> dict[str, list]:
    """Today's predictions at T (search_target's predicted_before_target) for the configs in `names` that its
    trials trained: [mean, sd, from what fraction of T, trial], from the trial trained furthest."""
    out: dict[str, list] = {}
    for t in optuna.load_study(study_name="target", storage=open_storage(None, search_dir)).trials:
        p = predicted_before_target(t) if "model" in t.user_attrs else None
        key = name(from_dict(ModelConfig, t.user_attrs["model"]), t.user_attrs["learning_rate"]) if p else None
        if key in names and (key not in out or p[2] > out[key][2]):
            out[key] = [p[0], p[1], p[2], t.number]
    return out


def run_benchmark(b: Bench, spec: Any, seeds: int, n_oracle: int) -> None:
    base = spec.base
    at_target(b, A, base, seeds)
    # The new search's pick comes second, so a benchmark stopped early still compares it with the default.
    if plan_search_ready():
        at_target(b, D, load_config(searched(b, "fit") / "best.toml"), seeds)
    rule = rule_pick(measure_speeds(b, spec), b.T)
    at_target(b, B, replace(base, model=from_dict(ModelConfig, rule["model"])), seeds)
    curves = searched(b, "curves")
    picked = load_config(curves / "best.toml")
    at_target(b, C, picked, seeds)
    taken = {shape(base.model), shape(from_dict(ModelConfig, rule["model"])), shape(picked.model)}
    models = grid(spec)
    for m in oracle_models(models, n_oracle, taken):  # named by its place in the grid, whatever --oracle is
        at_target(b, f"(e{models.index(m) + 1}) oracle", replace(base, model=m), 1)
    names = {r["name"] for r in b.ledger.data["runs"].values()}
    b.ledger.put("curves", "predictions", curves_predictions(curves, names))
    if not plan_search_ready():
        show_results(b.ledger.data)
        raise SystemExit(NO_PLAN.format(where=f" and kept in {b.ledger.path}" if b.kept else ""))
    fit = searched(b, "fit")
    at_target(b, D, load_config(fit / "best.toml"), seeds)
    runs = b.ledger.data["runs"].values()
    trained = {r["name"]: from_dict(ModelConfig, r["model"]) for r in runs}
    b.ledger.put("plan", "predictions", {k: plan_prediction(fit, m) for k, m in trained.items()})
    b.ledger.put("plan", "horizons", plan_horizons(fit, b.T))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "corpus", nargs="?", type=Path, default=DEFAULT_CORPUS, help="text corpus (default: Tiny Shakespeare)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny space, T = 60 s, S = 20 s")
    parser.add_argument(
        "--target-seconds", type=float, default=None, help="the target T (default 600; quick 60); S = T/10 (quick T/3)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="training seeds for each of (a)-(d)")
    parser.add_argument(
        "--oracle", type=int, default=None, help="oracle architectures trained for T (default 5; quick 3)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the searches, runs and results.json here")
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables of a kept run (its DIR), training nothing"
    )
    args = parser.parse_args()
    if args.report is not None:
        if not (args.report / "results.json").is_file():
            parser.error(f"{args.report / 'results.json'} not found: --report takes the DIR a run kept with --keep DIR")
        return show_results(json.loads((args.report / "results.json").read_text()), commands=True)
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found; pass a text file")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the seed noise is the yardstick of every goal")
    size = PLAN_QUICK if args.quick else PLAN
    T = args.target_seconds or size["target"]
    S = T * size["search_fraction"]
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    start = time.perf_counter()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="search_plan_") as tmp
    ):
        spec = parse_spec(planned_spec(args.corpus, size, T, "curves"))
        try:  # a T that S cannot search is refused now, not after hours of training
            with_target(spec, None, S)
        except MlxllmError as e:
            raise SystemExit(f"{e} Here S follows T: raise --target-seconds (it is {T:g} s, so S = {S:g} s).") from None
        if spec.space.params_of(spec.base) is None:
            raise SystemExit("The benchmark's space does not hold its default architecture: widen the space.")
        # The machine too: T is seconds of training, so runs kept from another CPU would not compare.
        header = {
            "corpus": str(args.corpus.resolve()),
            "target_s": T,
            "search_s": S,
            "quick": args.quick,
            "machine": f"{describe_cpu()}; MLX {device_name()}",
        }
        ledger = Ledger(Path(tmp) / "results.json", header)
        train_tokens = len(
            data_mod.prepare(spec.base.train.data, spec.base.tokenizer, val_fraction=spec.base.train.val_fraction).train
        )
        command = {"command": shlex.join(["python", *sys.argv]), "machine": f"{describe_cpu()}; MLX {device_name()}"}
        ledger.put("commands", time.strftime("%Y-%m-%d %H:%M:%S"), command)
        print(f"{command['command']}\nmachine: {command['machine']}", flush=True)
        print(
            f"corpus {args.corpus} ({train_tokens:,} training tokens); T = {T:g} s of training; "
            f"each search S = {S:g} s; {args.seeds} seeds",
            flush=True,
        )
        b = Bench(ledger, size, args.corpus, T, S, Path(tmp), train_tokens, args.keep is not None)
        run_benchmark(b, spec, args.seeds, args.oracle or size["oracle"])
        show_results(ledger.data)
    print(f"benchmark wall clock {time.perf_counter() - start:.0f} s; the machine's other load moves every figure")


if __name__ == "__main__":
    try:
        main()
    except MlxllmError as e:  # bad input, or a search that S cannot buy: its one paragraph, not a traceback
        raise SystemExit(str(e)) from None
