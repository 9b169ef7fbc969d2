"""When the fit planner does not act on its plan, and the paragraph it prints instead: the pick's prediction
is too loose to trust (its 2 sd at T wider than [target] max_2sd), or the fit cannot tell the pick from the
base architecture (its predicted gain within [target] switch_sd sd of the difference). Either way best.toml is the
base config, the user's default, with the reason on top: a search replaces it only with something it
shows to be better.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from mlxllm.config import ModelConfig

from mlxllm_search.forecast import Forecast, Prediction
from mlxllm_search.scaling import LawFit
from mlxllm_search.throughput import model_key


def shape(m: ModelConfig | dict[str, Any]) -> str:
    """An architecture in a few words (a ModelConfig, or its fields as a trial stores them)."""
    d = m if isinstance(m, dict) else asdict(m)
    heads = f"{d.get('n_heads')}/{d.get('n_kv_heads') or d.get('n_heads')} heads"
    return f"{d.get('n_layers')} x {d.get('d_model')}, {heads}, mlp {d.get('mlp_ratio'):.3g}"


# One search's sd moves from run to run (its trials' lengths follow this machine's speed of the moment), so the
# budget a loose fit names aims this share of max_2sd: the search it suggests acts, not one more on the edge.
AIM = 0.8


def longer_runs(law: LawFit, pick: Prediction, two_sd: float) -> float:
    """How many times longer the trials' runs must be for the pick's prediction to reach `two_sd` in 2 sd
    (LawFit.sd_with_longer_runs, which falls as the runs grow toward the scatter of one run; the speed's part
    of the pick's sd stays); inf where what stays is wider."""
    kept = max(0.0, pick.sd**2 - law.sd_with_longer_runs(pick.params, pick.tokens, 1.0) ** 2)

    def wide(factor: float) -> bool:
        return 2 * math.sqrt(law.sd_with_longer_runs(pick.params, pick.tokens, factor) ** 2 + kept) > two_sd

    if not wide(1.0):
        return 1.0
    lo, hi = 1.0, 2.0
    while wide(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e9:
            return math.inf
    while hi / lo > 1.01:  # the sd falls as the factor grows: bisect on its log
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if wide(mid) else (lo, mid)
    return hi


def too_loose(plan: Forecast, max_2sd: float, spent_s: float) -> str | None:
    """The paragraph in place of a number when the pick for T is more uncertain than `max_2sd`: what the
    trials measured, how far the pick is from it, and what would narrow it: the search budget whose trials, as
    many and each as much longer, would leave the pick AIM of max_2sd in 2 sd (longer_runs), or, where each
    run's own scatter around the law is wider than max_2sd, that more of the same search does not."""
    best, law = plan.pick(1.0), plan.law
    if best is None or law is None or 2 * best.sd <= max_2sd:
        return None
    lo, hi = law.n_range
    reach = best.tokens / law.tokens_max
    head = (
        f"The fit is too loose to act on: the pick's predicted loss at T is {best.loss:.2f} +- {2 * best.sd:.2f} "
        f"(2 sd; [target] max_2sd = {max_2sd:g}). Its {law.trials} trials measured {lo / 1e6:.3g}M to "
        f"{hi / 1e6:.3g}M parameters without embeddings and runs of at most {law.tokens_max:,.0f} tokens, while "
        f"the pick trains on {best.tokens:,.0f} at T ({reach:.0f}x that). "
    )
    # The part of the sd that more trials like these leave as it is: one run's scatter around the law.
    floor = 2 * law.scale * law.sigma
    aim = max(AIM * max_2sd, (floor + max_2sd) / 2)
    factor = longer_runs(law, best, aim) if floor < max_2sd else math.inf
    if math.isinf(factor):
        return head + (
            f"Their runs scatter around the fitted law by {law.sigma:.3f} in loss (x{law.scale:.2f} from the "
            f"held-out check), {floor:.2f} in 2 sd for any one run: wider than max_2sd, and more trials like these "
            "would not narrow it. Longer trials (--search-seconds) measure runs further from the start of training "
            f"and nearer the target's, which the law may fit closer; a max_2sd above {floor:.2f} acts on the plan "
            "as it is."
        )
    return head + (
        f"A search of roughly {spent_s * factor:,.0f} s (--search-seconds, against {spent_s:.0f} s here), its "
        f"trials' runs about {factor:.2g}x as long (the longest {factor * law.tokens_max:,.0f} tokens), would leave "
        f"the pick about {aim:.2f} in 2 sd: the law would credit less to tokens it did not measure and be "
        f"pinned closer, though not below the scatter of its runs around it, {law.sigma:.3f} in loss here "
        f"(x{law.scale:.2f} from the held-out check: {floor:.2f} in 2 sd for any one run), which may differ for the "
        "runs it measures; a shorter warm-up (train.warmup_steps) lets shorter runs count."
    )


def no_better(plan: Forecast, base: ModelConfig | None, switch_sd: float) -> str | None:
    """The paragraph in place of the pick when the fit cannot tell it from the base architecture (`base`, as a
    candidate; None: the space does not hold it): its predicted gain over the base at T is not above
    `switch_sd` ([target] switch_sd) sd of the difference (0: the pick as it is). The user's default stands
    until a search shows something better."""
    best, law = plan.pick(1.0), plan.law
    if not switch_sd or best is None or law is None or base is None or model_key(best.model) == model_key(base):
        return None
    b = plan.predict(base)
    gain, sd = law.difference((b.params, b.tokens), (best.params, best.tokens))
    if gain > switch_sd * sd:
        return None
    return (
        f"The fit cannot tell its pick from the base architecture: {shape(best.model)} is predicted "
        f"{gain:+.4f} lower in loss at T than the base's {b.loss:.4f} ({shape(base)}), where "
        f"[target] switch_sd = {switch_sd:g} asks for more than {switch_sd * sd:.4f} ({switch_sd:g} sd of the "
        f"difference: the fit's uncertainty and each run's scatter around the law, {law.sigma:.3f} here). Longer "
        "trials (--search-seconds) measure closer to the target and narrow it; switch_sd = 0 takes the pick as it is."
    )
