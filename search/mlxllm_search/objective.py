"""One trial: sample an architecture, train it on the shared budget, report each evaluation, measure its cost."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import optuna

from mlxllm.data import TokenData
from mlxllm.errors import MlxllmError
from mlxllm.trainer import train
from mlxllm_search.space import SearchSpec, run_config
from mlxllm_search.storage import LOST, OWNER, owner

GEN_TOKENS = 64


def generation_speed(run_dir: Path, tokens: int = GEN_TOKENS) -> float:
    """Tokens/s of greedy decoding with the KV cache, after a short warm-up."""
    from mlxllm.generate import generate_ids, load

    model, _ = load(run_dir, "latest")
    generate_ids(model, [0], 4, temperature=0)
    start = time.perf_counter()
    generate_ids(model, [0], tokens, temperature=0)
    return tokens / (time.perf_counter() - start)


def latency(step_ms: list[float]) -> float:
    """The fastest window after the first: the first holds compilation, and the CPU may be shared."""
    return min(step_ms[1:]) if len(step_ms) > 1 else step_ms[0]


class Objective:
    """Callable for `study.optimize`; `on_trial_start` lets the caller know a trial now exists (see storage.Gate)."""

    def __init__(self, spec: SearchSpec, search_dir: Path, data: TokenData,
                 on_trial_start: Callable[[], None] | None = None, on_eval: Callable[[], None] | None = None):
        self.spec, self.search_dir, self.data = spec, search_dir, data
        self.on_trial_start, self.on_eval = on_trial_start, on_eval

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr(OWNER, owner())  # before anything else: a sweep finds this trial if we die
        trial.set_user_attr(LOST, None)  # a retried trial inherits its original's mark
        if self.on_trial_start:
            self.on_trial_start()
        spec, caps = self.spec, self.spec.settings.caps
        model, lr = spec.space.suggest(trial, spec.base)
        run = run_config(spec, model, lr, self.search_dir / "trials" / f"{trial.number:04d}")
        n_params = replace(model, vocab_size=self.data.tokenizer.vocab_size).num_params()
        trial.set_user_attr("model", {k: v for k, v in asdict(model).items() if k != "vocab_size"})
        trial.set_user_attr("learning_rate", lr)
        trial.set_user_attr("params", n_params)

        if caps.params is not None:
            trial.set_constraint("params", n_params - caps.params)
            if n_params > caps.params:
                self._reject(trial, f"{n_params:,} parameters > cap {caps.params:,}")

        measured: dict[str, list[float]] = {"step_ms": [], "memory_gb": []}

        def report(metrics: dict[str, Any]) -> None:
            step = metrics["step"]
            measured["step_ms"].append(1000 * spec.tokens_per_step / metrics["tokens_per_sec"])
            measured["memory_gb"].append(metrics["peak_memory_gb"])
            self._check_measured_caps(trial, measured)
            if not spec.settings.multi:  # Optuna prunes single-objective studies only
                trial.report(metrics["val_loss"], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation loss {metrics['val_loss']:.4f} at step {step}")
            if self.on_eval:
                self.on_eval()

        mx.reset_peak_memory()  # a worker trains many trials; each is measured on its own
        try:
            result = train(run.model, run.train, run.tokenizer, overwrite=True, callback=report, show_progress=False,
                           data=self.data)
        except KeyboardInterrupt:
            trial.set_user_attr(LOST, "interrupted")  # retried when the search resumes
            raise
        if result.val_loss is None or not math.isfinite(result.val_loss):
            raise MlxllmError(f"trial {trial.number} ended without a finite validation loss")
        if not measured["step_ms"]:  # the budget ended before the first evaluation callback
            measured["step_ms"].append(1000 * result.elapsed / max(result.step, 1))
            measured["memory_gb"].append(mx.get_peak_memory() / 1e9)

        values = {
            "val_loss": result.val_loss,
            "params": float(n_params),
            "step_ms": latency(measured["step_ms"]),
            "memory_gb": max(measured["memory_gb"]),
        }
        if "gen_tokens_per_sec" in spec.settings.objectives:
            values["gen_tokens_per_sec"] = generation_speed(result.run_dir)
        for k in ("step_ms", "memory_gb", "gen_tokens_per_sec", "val_loss"):
            if k in values:
                trial.set_user_attr(k, values[k])
        for name, cap in caps.items():
            if name != "params":
                trial.set_constraint(name, values[name] - cap)
        trial.set_user_attr("steps", result.step)
        out = [values[o] for o in spec.settings.objectives]
        return out if spec.settings.multi else out[0]

    def _check_measured_caps(self, trial: optuna.Trial, measured: dict[str, list[float]]) -> None:
        """Stop at the first evaluation that shows the trial over a memory or latency cap."""
        caps = self.spec.settings.caps
        now = {"memory_gb": max(measured["memory_gb"]), "step_ms": latency(measured["step_ms"])}
        for name, cap in caps.items():
            if name == "memory_gb" or (name == "step_ms" and len(measured["step_ms"]) > 1):
                if now[name] > cap:
                    trial.set_constraint(name, now[name] - cap)
                    trial.set_user_attr(name, now[name])
                    self._reject(trial, f"{name} {now[name]:.3g} > cap {cap:g}")

    @staticmethod
    def _reject(trial: optuna.Trial, why: str) -> None:
        # Pruned with its constraint violation recorded: the sampler learns to avoid it, best_trials skips it.
        trial.set_user_attr("rejected", why)
        raise optuna.TrialPruned(f"over a cap: {why}")
