"""Target-aware search: does optimising for the run the user will train pick a better config for it?

    python benchmarks/search_target.py [CORPUS] [--quick] [--target-seconds T] [--seeds 2] [--tau-archs 6]
                                       [--keep DIR | --report DIR]

The target is T seconds of training on this machine (5 minutes; --quick 10 s); each search gets a budget of
6T of wall clock. Then three configs are trained for T, with --seeds training seeds each:
  (a) the default: mlxllm's own architecture and learning rate (ModelConfig() and TrainConfig() defaults) on
      the benchmark's context and batch (the tiny quick space has its own small default);
  (b) the winner of the fixed-budget search (every trial the same 300 steps; --quick 60), given the same 6T,
      trained for T as a user would: its best.toml with train.max_seconds = T;
  (c) the winner of the target-aware search (--target-seconds T --search-seconds 6T), its best.toml as is.
Printed: the validation loss at T per config and seed, its seed noise, and how well the target-aware search
predicts: --tau-archs architectures it saw (spread over its ranking) are trained for T, and the Kendall tau
between the loss it predicted for each (from the longest rung short of T it trained) and the loss measured.
With --keep DIR, the studies, runs and a results.json of every figure stay in DIR (else a temporary folder);
--report DIR prints the tables of such a run again, training nothing.

Both searches start from the default config. The full version takes about 2 h 10 min on a 2-core CPU
(two 30-minute searches, 6 runs of 5 minutes for (a)-(c), 6 more for the rank correlation, set-up);
--quick about 5 minutes. Timings, and so every figure, move with other work on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mlxllm.config import ModelConfig, RunConfig, TrainConfig, load_config
from mlxllm.tokenizer import ByteTokenizer
from mlxllm.trainer import train

import optuna
from mlxllm_search import search
from mlxllm_search.curve import kendall_tau
from mlxllm_search.predict import free_fit, predict, typical_exponent
from mlxllm_search.records import record_of
from mlxllm_search.spec import parse_spec
from mlxllm_search.speed import Point
from mlxllm_search.storage import open_storage
from mlxllm_search.target import HUGE_STEPS
from optuna.trial import FrozenTrial

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"

_MODEL, _TRAIN = ModelConfig(), TrainConfig()
FULL = dict(
    target=300.0,
    seq_len=128,
    batch=16,
    fixed_steps=300,
    eval_interval=50,
    final_eval_interval=100,
    startup=6,
    default={
        "n_layers": _MODEL.n_layers,
        "d_model": _MODEL.d_model,
        "n_heads": _MODEL.n_heads,
        "mlp_ratio": _MODEL.mlp_ratio,
    },
    learning_rate=_TRAIN.learning_rate,
    warmup=_TRAIN.warmup_steps,
    space={
        "n_layers": {"min": 1, "max": 6},
        "head_dim": [32, 64],
        "n_heads": [1, 2, 4],
        "kv_group": [1, 2],
        "mlp_ratio": {"min": 2.0, "max": 4.0},
        "learning_rate": {"min": 5e-4, "max": 1e-2, "log": True},
    },
)
QUICK = dict(
    target=10.0,
    seq_len=32,
    batch=4,
    fixed_steps=60,
    eval_interval=20,
    final_eval_interval=50,
    startup=3,
    default={"n_layers": 1, "d_model": 32, "n_heads": 2, "mlp_ratio": 2.0},
    learning_rate=3e-3,
    warmup=10,
    space={
        "n_layers": [1, 2],
        "head_dim": [16],
        "n_heads": [1, 2],
        "kv_group": [1],
        "mlp_ratio": [2.0],
        "learning_rate": {"min": 1e-3, "max": 2e-2, "log": True},
    },
)


def spec_dict(corpus: Path, size: dict, target: float | None) -> dict:
    """The search spec: with a [target] of `target` seconds, else today's equal [budget] of steps per trial."""
    d = {
        "name": "target" if target else "fixed",
        "base": {
            "model": {**size["default"], "max_seq_len": size["seq_len"]},
            "tokenizer": {"kind": "byte"},
            "train": {
                "data": str(corpus),
                "batch_size": size["batch"],
                "learning_rate": size["learning_rate"],
                "warmup_steps": size["warmup"],
                "eval_interval": size["final_eval_interval"],
                "eval_batches": 4,
                "keep_last": 1,
                "sample_tokens": 0,
                "seed": 0,
            },
        },
        "space": size["space"],
        "search": {
            "objectives": ["val_loss"],
            "sampler": "tpe",
            "startup_trials": size["startup"],
            "pruner": "successive-halving" if target else "hyperband",
        },
    }
    if target:
        d["target"] = {"seconds": target}
    else:
        d["budget"] = {"kind": "steps", "amount": size["fixed_steps"], "eval_interval": size["eval_interval"]}
    return d


def for_target(run: RunConfig, seconds: float, seed: int, eval_interval: int, out: Path) -> RunConfig:
    """The run trained for `seconds` (its schedule over them), as a user would from a best.toml; every config
    evaluates as often, so none loses more of its T to evaluations."""
    return replace(
        run,
        train=replace(
            run.train,
            max_steps=HUGE_STEPS,
            max_tokens=None,
            max_seconds=seconds,
            seed=seed,
            eval_interval=eval_interval,
            log_interval=eval_interval,
            out_dir=str(out),
        ),
    )


def train_result(run: RunConfig, seconds: float, seed: int, eval_interval: int, out: Path):
    """The run trained for `seconds` (for_target): the trainer's TrainResult (loss, steps, tokens, time)."""
    r = for_target(run, seconds, seed, eval_interval, out)
    return train(r, overwrite=True, show_progress=False)


def train_for(run: RunConfig, seconds: float, seed: int, eval_interval: int, out: Path) -> float:
    return float(train_result(run, seconds, seed, eval_interval, out).val_loss)


def predicted_before_target(t: FrozenTrial) -> tuple[float, float, float] | None:
    """The prediction the search made from the longest rung short of the target this trial trained:
    (mean, sd, that rung as a fraction of the target)."""
    preds = {k: v for k, v in (record_of(t).predictions or {}).items() if k < 1}
    if not preds:
        return None
    mean, std = preds[max(preds)]
    return float(mean), float(std), max(preds)


def spread(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    """n distinct architectures (with learning rate) spread evenly over the search's predicted ranking."""
    seen, unique = set(), []
    for t in sorted(trials, key=lambda t: predicted_before_target(t)[0]):
        key = tuple(sorted(t.params.items()))
        if key not in seen:
            seen.add(key)
            unique.append(t)
    if len(unique) <= n:
        return unique
    return [unique[round(i * (len(unique) - 1) / (n - 1))] for i in range(n)]


def run_config_of(t: FrozenTrial, base: RunConfig) -> RunConfig:
    from mlxllm.config import from_dict

    record = record_of(t)
    model = from_dict(ModelConfig, record.model)
    return replace(base, model=model, train=replace(base.train, learning_rate=record.learning_rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "corpus", nargs="?", type=Path, default=DEFAULT_CORPUS, help="text corpus (default: Tiny Shakespeare)"
    )
    parser.add_argument("--quick", action="store_true", help="a small version: tiny space, a 10 s target")
    parser.add_argument("--target-seconds", type=float, default=None, help="the target T (default 300; quick 10)")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per config trained for T")
    parser.add_argument("--tau-archs", type=int, default=6, help="architectures trained for T to check the predictions")
    parser.add_argument("--keep", type=Path, default=None, help="keep the studies, runs and results.json here")
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables of a kept run (its DIR), training nothing"
    )
    args = parser.parse_args()
    if args.report is not None:
        return report(args.report, args.corpus, QUICK if args.quick else FULL)
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found; pass a text file")
    size = QUICK if args.quick else FULL
    T = args.target_seconds or size["target"]
    S = 6 * T
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    start = time.perf_counter()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="search_target_")
    ) as tmp:
        root = Path(tmp)
        print(
            f"corpus {args.corpus}; target T = {T:g} s of training; each search {S:g} s; {args.seeds} seeds", flush=True
        )
        fixed_spec, target_spec = (
            parse_spec(spec_dict(args.corpus, size, None)),
            parse_spec(spec_dict(args.corpus, size, T)),
        )
        fixed = search(fixed_spec, out=root / "fixed", seed=0, show=False, search_seconds=S)
        print(f"  fixed-budget search: {len(fixed.study.trials)} trials in {fixed.seconds:.0f} s", flush=True)
        targeted = search(target_spec, out=root / "target", seed=0, show=False, search_seconds=S)
        print(f"  target-aware search: {len(targeted.study.trials)} trials in {targeted.seconds:.0f} s", flush=True)

        configs = {
            "(a) default": fixed_spec.base,
            "(b) fixed-budget winner": load_config(fixed.best_config),
            "(c) target-aware winner": load_config(targeted.best_config),
        }
        losses: dict[str, list[float]] = {}
        for name, run in configs.items():
            losses[name] = [
                train_for(run, T, seed, size["final_eval_interval"], root / f"final-{name[1]}-{seed}")
                for seed in range(args.seeds)
            ]
            print(f"  {name}: {', '.join(f'{v:.4f}' for v in losses[name])}", flush=True)

        seen = [t for t in targeted.study.trials if predicted_before_target(t) is not None and record_of(t).model]
        check = spread(seen, args.tau_archs)
        pairs = []
        for i, t in enumerate(check):
            actual = train_for(run_config_of(t, target_spec.base), T, 0, size["final_eval_interval"], root / f"tau-{i}")
            pairs.append((t.number, *predicted_before_target(t), actual))
            print(
                f"  trial {t.number}: predicted {pairs[-1][1]:.4f} +- {pairs[-1][2]:.4f} from {pairs[-1][3]:.3g} of T, "
                f"measured {actual:.4f}",
                flush=True,
            )
        if args.keep:
            (root / "results.json").write_text(
                json.dumps(
                    {
                        "target_s": T,
                        "search_s": S,
                        "losses": losses,
                        "pairs": [
                            {"trial": n, "predicted": m, "sd": sd, "from_fraction": f, "measured": a}
                            for n, m, sd, f, a in pairs
                        ],
                    },
                    indent=2,
                )
            )

    show(configs, losses, pairs, T, args.seeds)
    print(f"benchmark wall clock {time.perf_counter() - start:.0f} s; the machine's other load moves every figure")


def report(root: Path, corpus: Path, size: dict) -> None:
    """The tables of a run kept with --keep, from its results.json and best.toml files."""
    r = json.loads((root / "results.json").read_text())
    configs = {
        "(a) default": parse_spec(spec_dict(corpus, size, None)).base,
        "(b) fixed-budget winner": load_config(root / "fixed" / "best.toml"),
        "(c) target-aware winner": load_config(root / "target" / "best.toml"),
    }
    pairs = [(p["trial"], p["predicted"], p["sd"], p["from_fraction"], p["measured"]) for p in r["pairs"]]
    seeds = len(next(iter(r["losses"].values())))
    show(configs, r["losses"], pairs, r["target_s"], seeds)
    trials = optuna.load_study(study_name="target", storage=open_storage(None, root / "target")).trials
    again = [
        (n, *repredict(trials, n, frac, size["warmup"], shared=True), frac, actual) for n, _, _, frac, actual in pairs
    ]
    print(
        "\nan alternative, not what the search does: the same predictions with the exponent of the trials trained "
        "furthest (median of their fits) for every shallower trial"
    )
    show_predictions(again, noise_of(r["losses"], seeds))
    rung_errors(trials, size["warmup"])


def deep_exponent(trials: list[FrozenTrial], number: int, fraction: float) -> float | None:
    """The median exponent of the free fits of the trials trained furthest (two or more, `number` left out),
    for a trial at a shorter rung; else None (the trial fits its own)."""
    fits = [(record_of(t).rung or 0.0, fit[2]) for t in trials if t.number != number and (fit := free_fit(t))]
    deepest = max((r for r, _ in fits), default=0.0)
    deep = [c for r, c in fits if r >= deepest * 0.999]
    return statistics.median(deep) if len(deep) >= 2 and fraction < deepest * 0.999 else None


def repredict(
    trials: list[FrozenTrial], number: int, fraction: float, warmup: int, shared: bool
) -> tuple[float, float]:
    """Trial `number`'s prediction from its evaluations up to the rung `fraction`, made again as the search
    makes it, or (shared) with deep_exponent, from the study as it ended (the benchmark's specs use byte tokens)."""
    record = record_of(next(x for x in trials if x.number == number))
    segments: list[list[Point]] = []
    for p in record.points:
        if p.first or not segments:  # each rung is one training call, whose first evaluation is marked
            segments.append([])
        segments[-1].append(p)
    rung = sorted(record.predictions).index(fraction)
    points = [p for seg in segments[: rung + 1] for p in seg]
    others = [x for x in trials if x.number != number]
    mean, sd, _ = predict(
        points,
        warmup,
        record.steps_at_target,
        typical_exponent(others),
        ByteTokenizer.vocab_size,
        deep_exponent(trials, number, fraction) if shared else None,
    )
    return mean, sd


def rung_errors(trials: list[FrozenTrial], warmup: int) -> None:
    """Over the trials the search itself trained to the target: each earlier rung's prediction against the
    loss measured at the target: as the search recorded it, made again by this code (a check that the
    recorded evaluations reproduce it), and with the alternative exponent."""
    measured = [(t.number, r) for t in trials if (r := record_of(t)).actual is not None]
    print(
        f"\npredictions from each rung for the {len(measured)} trials the search trained to T "
        "(mean |error|; tau among them):"
    )
    for f in sorted({k for _, r in measured for k in r.predictions if k < 1}):
        rows = [
            (
                v[0],
                repredict(trials, number, f, warmup, False)[0],
                repredict(trials, number, f, warmup, True)[0],
                r.actual,
            )
            for number, r in measured
            for k, v in r.predictions.items()
            if abs(k - f) < 1e-9
        ]
        if len(rows) < 2:
            continue
        cells = [
            f"{who} {statistics.mean(abs(r[3] - r[i]) for r in rows):.4f}, tau "
            f"{kendall_tau([r[i] for r in rows], [r[3] for r in rows]):+.2f}"
            for i, who in enumerate(("recorded", "made again", "shared exponent"))
        ]
        print(f"  from {f:.3g} of T ({len(rows)} trials): " + "; ".join(cells))


def show(
    configs: dict[str, RunConfig], losses: dict[str, list[float]], pairs: list[tuple], T: float, seeds: int
) -> None:
    """The tables: loss at T per config and seed with the seed noise, then predicted against measured."""
    print()
    print(f"validation loss after T = {T:g} s of training ({seeds} seeds)")
    print(
        f"{'config':<26} {'arch (layers x d_model, heads/kv, mlp, lr)':<44} "
        + " ".join(f"{'seed ' + str(s):>8}" for s in range(seeds))
        + f" {'mean':>8} {'sd':>7}"
    )
    for name, run in configs.items():
        m, v = run.model, losses[name]
        arch = f"{m.n_layers} x {m.d_model}, {m.n_heads}/{m.kv_heads}, {m.mlp_ratio:.2f}, {run.train.learning_rate:.2e}"
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{name:<26} {arch:<44} " + " ".join(f"{x:>8.4f}" for x in v) + f" {statistics.mean(v):>8.4f} {sd:>7.4f}")
    noise = noise_of(losses, seeds)
    print(f"seed noise (mean sd over the configs): {noise:.4f}")
    for name in list(configs)[1:]:
        gain = statistics.mean(losses["(a) default"]) - statistics.mean(losses[name])
        print(
            f"{name} improves on the default by {gain:.4f}"
            + (f" ({gain / noise:.1f}x the seed noise)" if noise else "")
        )
    gap = statistics.mean(losses["(b) fixed-budget winner"]) - statistics.mean(losses["(c) target-aware winner"])
    print(f"target-aware vs fixed-budget winner: {gap:+.4f} (positive: the target-aware winner is better at T)")
    show_predictions(pairs, noise)


def noise_of(losses: dict[str, list[float]], seeds: int) -> float:
    return statistics.mean(statistics.stdev(v) for v in losses.values()) if seeds > 1 else 0.0


def show_predictions(pairs: list[tuple], noise: float, label: str = "trial") -> None:
    """Predicted against measured at T, with Kendall tau and the order of the pairs the seed noise cannot swap;
    each pair is (what was predicted, e.g. a trial number, headed `label`; mean; sd; from what fraction of T;
    measured)."""
    print()
    w = max(5, len(label), *(len(str(p[0])) for p in pairs))
    print(f"{label:>{w}} {'from':>6} {'predicted':>10} {'sd':>7} {'measured':>9} {'error':>8}")
    for number, mean, std, frac, actual in pairs:
        print(f"{number!s:>{w}} {frac:>6.3g} {mean:>10.4f} {std:>7.4f} {actual:>9.4f} {actual - mean:>+8.4f}")
    if len(pairs) < 2:
        return
    tau = kendall_tau([p[1] for p in pairs], [p[4] for p in pairs])
    within = sum(abs(p[4] - p[1]) <= 2 * p[2] for p in pairs)
    print(
        f"Kendall tau (predicted vs measured at T) over {len(pairs)} architectures: {tau:+.2f}; "
        f"{within}/{len(pairs)} measured within 2 sd of the prediction"
    )
    apart = [(a, b) for i, a in enumerate(pairs) for b in pairs[i + 1 :] if abs(a[4] - b[4]) > 2 * noise]
    if noise and apart:
        agree = sum((a[1] - b[1]) * (a[4] - b[4]) > 0 for a, b in apart)
        print(
            f"pairs whose measured losses differ by more than 2x the seed noise ({2 * noise:.4f}): {len(apart)} of "
            f"{len(pairs) * (len(pairs) - 1) // 2}; the prediction orders {agree} of them as measured"
        )


if __name__ == "__main__":
    main()
