"""The tables of benchmarks/search_plan.py, from its results.json: what it prints at the end and with --report."""

from __future__ import annotations

import math
import statistics

from mlxllm.config import ModelConfig, from_dict

from mlxllm_search.curve import kendall_tau
from search_target import noise_of, show_predictions

TOKENS_PER_PARAM = 20  # (b): Chinchilla's compute-optimal ratio, the one nanochat sizes by
A, B, C, D = "(a) default", "(b) 20 tokens per parameter", "(c) today's target search", "(d) plan search"


def shape(model: ModelConfig) -> str:
    return f"{model.n_layers}x{model.d_model} h{model.n_heads}/{model.kv_heads} f{model.hidden_dim}"


def rule_pick(speeds: dict[str, dict], T: float) -> dict:
    """(b): the largest architecture with TOKENS_PER_PARAM tokens per parameter at T, else the smallest."""
    ok = [s for s in speeds.values() if s["tokens_per_s"] * T >= TOKENS_PER_PARAM * s["params"]]
    return max(ok, key=lambda s: s["params"]) if ok else min(speeds.values(), key=lambda s: s["params"])


def show_results(d: dict, commands: bool = False) -> None:
    """Every table, from a results.json's figures; with `commands`, first the command lines that made them."""
    h, runs = d["header"], list(d.get("runs", {}).values())
    for when, c in d.get("commands", {}).items() if commands else ():
        print(f"{when}: {c['command']}\n  machine: {c['machine']}")
    if commands:
        print(f"corpus {h['corpus']}; T = {h['target_s']:g} s of training; each search S = {h['search_s']:g} s")
    for planner, r in d.get("searches", {}).items():
        print(f"{planner} search: {r['trials']} trials in {r['seconds']:.0f} s")
    labels = list(dict.fromkeys(r["label"] for r in runs))
    losses = {
        lab: [r["val_loss"] for r in sorted(runs, key=lambda r: r["seed"]) if r["label"] == lab] for lab in labels
    }
    seeded = {lab: v for lab, v in losses.items() if len(v) > 1}
    noise = noise_of(seeded, 2) if seeded else 0.0
    show_rule(d.get("speeds", {}), h["target_s"])
    show_losses(runs, labels, losses, h["target_s"])
    measured = {r["name"]: [x["val_loss"] for x in runs if x["name"] == r["name"]] for r in runs}
    who = {k: "".join(dict.fromkeys(r["label"].split()[0] for r in runs if r["name"] == k)) for k in measured}
    best = min(measured, key=lambda k: statistics.mean(measured[k]), default=None)
    print(f"seed noise (mean sd over the {len(seeded)} configs trained with several seeds): {noise:.4f}")
    if best is not None:
        print(f"the oracle's best: {who[best]} {best}, {statistics.mean(measured[best]):.4f}")
    today = {k: [*v[:3], f"{v[3]} {who[k]}"] for k, v in d.get("curves", {}).get("predictions", {}).items()}
    print("\ntoday's target-aware search: its predictions at T for the architectures its trials trained")
    scores = {"curves": show_forecast(today, measured, noise, "trial"), "fit": (None, (0, 0))}
    plan = d.get("plan", {})
    if plan:
        print(
            "\n(d) the plan search's forecast at T for every architecture trained for T "
            f"(from a search of {h['search_s']:g} s)"
        )
        pred = {k: [*v, h["search_s"] / h["target_s"], who[k]] for k, v in plan["predictions"].items() if v}
        scores["fit"] = show_forecast(pred, measured, noise, "config")
        show_horizons(plan.get("horizons", []), h["target_s"])
    means = {lab: statistics.mean(v) for lab, v in losses.items()}
    show_goals(means, noise, statistics.mean(measured[best]) if best else math.nan, *scores["fit"])


def show_rule(speeds: dict[str, dict], T: float) -> None:
    if not speeds:
        return
    rows, pick = sorted(speeds.values(), key=lambda s: s["params"]), rule_pick(speeds, T)
    i = rows.index(pick)
    print(
        f"\n(b) tokens at T = {T:g} s per parameter (measured tokens/s x T), the architectures around the rule's pick:"
    )
    for s in rows[max(0, i - 3) : i + 4]:
        ratio, mark = s["tokens_per_s"] * T / s["params"], " <- (b)" if s is pick else ""
        m = from_dict(ModelConfig, s["model"])
        print(f"  {shape(m):<22} {s['params'] / 1e6:>6.2f}M {s['tokens_per_s']:>8,.0f} tok/s {ratio:>7.1f}{mark}")
    ok = sum(s["tokens_per_s"] * T >= TOKENS_PER_PARAM * s["params"] for s in rows)
    print(f"  {ok} of the grid's {len(rows)} architectures reach {TOKENS_PER_PARAM} tokens per parameter at T")


def show_losses(runs: list[dict], labels: list[str], losses: dict[str, list[float]], T: float) -> None:
    n = max(map(len, losses.values()), default=0)
    print(f"\nvalidation loss after T = {T:g} s of training")
    print(
        f"{'config':<28} {'architecture':<30} {'params':>7} "
        + " ".join(f"{'seed ' + str(s):>7}" for s in range(n))
        + f" {'mean':>7} {'sd':>7} {'epochs':>6}"
    )
    for lab in labels:
        r, v = next(r for r in runs if r["label"] == lab), losses[lab]
        cells = [f"{x:>7.4f}" for x in v] + [" " * 7] * (n - len(v))
        sd = f"{statistics.stdev(v):>7.4f}" if len(v) > 1 else " " * 7
        print(
            f"{lab:<28} {r['name']:<30} {r['params'] / 1e6:>6.2f}M {' '.join(cells)} {statistics.mean(v):>7.4f} {sd} "
            f"{r['epochs']:>6.1f}"
        )


def show_forecast(
    pred: dict[str, list], measured: dict[str, list[float]], noise: float, label: str
) -> tuple[float | None, tuple[int, int]]:
    """Predicted (pred: name -> [mean, sd, from what fraction of T, the row's name]) against measured, by
    search_target's show_predictions, the row's name headed `label`; then the calibration over every measured
    loss. Returns (tau, (within 2 sd, measured losses))."""
    pairs = [(v[3], v[0], v[1], v[2], statistics.mean(measured[k])) for k, v in pred.items()]
    if not pairs:
        print("  none")
        return None, (0, 0)
    show_predictions(pairs, noise, label)
    runs = [(v[0], v[1], x) for k, v in pred.items() for x in measured[k]]
    within = sum(abs(x - m) <= 2 * sd for m, sd, x in runs)
    print(f"calibration: {within}/{len(runs)} measured losses (every seed) within 2 sd of the prediction")
    tau = kendall_tau([p[1] for p in pairs], [p[4] for p in pairs]) if len(pairs) > 1 else None
    return tau, (within, len(runs))


def show_horizons(horizons: list[dict], T: float) -> None:
    print("\n(d) the plan for other budgets:")
    for h in horizons:
        m = from_dict(ModelConfig, h["model"])
        note = " (extrapolated)" if h["extrapolated"] else ""
        print(
            f"  {h['seconds'] / T:>5.2g} T ({h['seconds']:>6.0f} s): {shape(m):<22} "
            f"{h['mean']:.4f} +- {h['sd']:.4f}{note}"
        )


def show_goals(means: dict[str, float], noise: float, best: float, tau: float | None, calib: tuple[int, int]) -> None:
    print("\nthe issue's goals:")
    if D not in means:
        print("  (d) not measured yet: no goal can be judged")
        return
    d, two = means[D], 2 * noise
    rows = [
        ("(d) within 2x seed noise of the oracle's best", d - best <= two, f"{d:.4f} - {best:.4f} = {d - best:+.4f}"),
        *(
            (f"(d) better than {x[:3]} by more than 2x seed noise", means[x] - d > two, f"by {means[x] - d:+.4f}")
            for x in (A, B)
            if x in means
        ),
        *(
            ("(d) not worse than (c) by more than 2x seed noise", d - means[C] <= two, f"{d - means[C]:+.4f}")
            for _ in [C]
            if C in means
        ),
    ]
    for what, ok, figures in rows:
        print(f"  {'PASS' if ok else 'MISS'}  {what}: {figures} (2x seed noise {two:.4f})")
    missing = [x[:3] for x in (A, B, C) if x not in means]
    if missing:  # a benchmark stopped early (--keep): those goals wait for its rerun
        print(f"  (not measured yet: {', '.join(missing)}; the oracle's best is over what was trained)")
    verdict = "PASS" if tau is not None and tau >= 0.7 else "MISS"
    print(f"  {verdict}  Kendall tau >= 0.7: {'none' if tau is None else f'{tau:+.2f}'}")
    share = calib[0] / calib[1] if calib[1] else 0.0
    print(f"  {'PASS' if share >= 0.8 else 'MISS'}  calibration >= 80%: {calib[0]}/{calib[1]} = {share:.0%}")
