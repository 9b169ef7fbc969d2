"""One trial: sample an architecture, train it on the shared budget (or rung by rung towards the target,
rungs.py), report each evaluation, measure its cost. An architecture over the parameter cap is rejected
before it trains, and does not count as a trial."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mlxllm.config import RunConfig
from mlxllm.data import TokenData
from mlxllm.errors import MlxllmError
from mlxllm.trainer import train

import mlx.core as mx
import optuna

from mlxllm_search.deadlines import Deadlines
from mlxllm_search.records import record_of, store
from mlxllm_search.rungs import RungTrainer
from mlxllm_search.space import SearchSpec, run_config
from mlxllm_search.storage import owner

GEN_TOKENS = 64


def generation_speed(run_dir: Path, tokens: int = GEN_TOKENS) -> float:
    """Tokens/s of greedy decoding with the KV cache, after a short warm-up."""
    from mlxllm.generate import Decoder, generate_ids, load

    model, _ = load(run_dir, "latest")
    decoder = Decoder(model)  # one decoder, so the timed call does not trace again
    generate_ids(model, [0], 4, temperature=0, decoder=decoder)
    start = time.perf_counter()
    generate_ids(model, [0], tokens, temperature=0, decoder=decoder)
    return tokens / (time.perf_counter() - start)


def latency(step_ms: list[float]) -> float:
    """The fastest window after the first: the first holds compilation, and the CPU may be shared."""
    return min(step_ms[1:]) if len(step_ms) > 1 else step_ms[0]


def _last_step(run: RunConfig) -> int:
    """The step a steps or tokens budget ends at (a seconds budget: as far as max_steps allows)."""
    t = run.train
    if t.max_tokens is None:
        return t.max_steps
    return min(
        t.max_steps, math.ceil(t.max_tokens / (t.batch_size * (t.seq_len or run.model.max_seq_len) * t.grad_accum))
    )


class Objective:
    """Callable for `study.optimize`; `on_trial_start` lets the caller know a trial now exists (see storage.Gate)."""

    def __init__(
        self,
        spec: SearchSpec,
        search_dir: Path,
        data: TokenData,
        on_trial_start: Callable[[], None] | None = None,
        on_eval: Callable[[], None] | None = None,
        deadlines: Deadlines | None = None,
    ):
        self.spec, self.search_dir, self.data = spec, search_dir, data
        self.on_trial_start, self.on_eval = on_trial_start, on_eval
        self.deadlines = deadlines or Deadlines()

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        store(trial, worker=owner())  # before anything else: a sweep finds this trial if we die
        store(trial, lost=None)  # a retried trial inherits its original's mark
        if self.on_trial_start:
            self.on_trial_start()
        spec, caps = self.spec, self.spec.settings.caps
        sample = spec.space.suggest(trial, spec.base)
        run = run_config(spec, sample, self.search_dir / "trials" / f"{trial.number:04d}")
        n_params = replace(sample.model, vocab_size=self.data.tokenizer.vocab_size).num_params()
        store(
            trial,
            model={k: v for k, v in asdict(sample.model).items() if k != "vocab_size"},
            learning_rate=sample.learning_rate,
            weight_decay=sample.weight_decay,
            params=n_params,
        )

        if caps.params is not None:
            trial.set_constraint("params", n_params - caps.params)
            if n_params > caps.params:
                store(trial, free=True)
                self._reject(trial, f"{n_params:,} parameters > cap {caps.params:,}")

        measured: dict[str, list[float]] = {"step_ms": [], "memory_gb": []}

        def measure(metrics: dict[str, Any]) -> None:
            measured["step_ms"].append(1000 * spec.tokens_per_step / metrics["tokens_per_sec"])
            measured["memory_gb"].append(metrics["peak_memory_gb"])
            self._check_measured_caps(trial, measured)

        def at_eval(metrics: dict[str, Any]) -> None:
            measure(metrics)
            self._refresh()

        mx.reset_peak_memory()  # a worker trains many trials; each is measured on its own
        start = time.perf_counter()
        try:
            if spec.target is None:
                loss = self._train_budget(trial, run, measure)
            else:
                loss = RungTrainer(spec, spec.plan, self.data, self.deadlines, at_eval).train(trial, run)
        except KeyboardInterrupt:
            store(trial, lost="interrupted")  # retried when the search resumes
            raise
        finally:
            store(trial, seconds=time.perf_counter() - start)  # what the trial cost the search
        if not math.isfinite(loss):
            raise MlxllmError(f"trial {trial.number} ended without a finite validation loss")
        record = record_of(trial)
        if not measured["step_ms"]:  # the budget ended before the first evaluation callback
            measured["step_ms"].append(1000 * (record.elapsed or 0.0) / max(record.steps or 1, 1))
            measured["memory_gb"].append(mx.get_peak_memory() / 1e9)

        values = {
            "val_loss": loss,
            "params": float(n_params),
            "step_ms": latency(measured["step_ms"]),
            "memory_gb": max(measured["memory_gb"]),
        }
        if "gen_tokens_per_sec" in spec.settings.objectives:
            values["gen_tokens_per_sec"] = generation_speed(Path(record.run_dir))
        store(
            trial, **{k: values[k] for k in ("step_ms", "memory_gb", "gen_tokens_per_sec", "val_loss") if k in values}
        )
        for name, cap in caps.items():
            if name != "params":
                trial.set_constraint(name, values[name] - cap)
        out = [values[o] for o in spec.settings.objectives]
        return out if spec.settings.multi else out[0]

    def _refresh(self) -> None:
        if self.on_eval:
            self.on_eval()

    def _train_budget(self, trial: optuna.Trial, run: RunConfig, measure: Callable[[dict[str, Any]], None]) -> float:
        """Train the [budget], reporting each evaluation to the pruner; returns the final validation loss."""

        def report(metrics: dict[str, Any]) -> None:
            measure(metrics)
            step = metrics["step"]
            if self.deadlines.left() <= 0:  # a shorter trial's loss would not compare with the others'
                store(trial, cut=f"search budget spent at step {step}")
                raise optuna.TrialPruned(f"the search's time budget ended at step {step}")
            if not self.spec.settings.multi:  # Optuna prunes single-objective studies only
                trial.report(metrics["val_loss"], step)
                # A trial at its last evaluation has trained its whole budget: it is finished, not pruned.
                if step < _last_step(run) and trial.should_prune():
                    raise optuna.TrialPruned(f"validation loss {metrics['val_loss']:.4f} at step {step}")
            self._refresh()

        result = train(run, overwrite=True, callback=report, show_progress=False, data=self.data)
        if result.val_loss is None or not math.isfinite(result.val_loss):
            raise MlxllmError(f"trial {trial.number} ended without a finite validation loss")
        store(trial, steps=result.step, elapsed=result.elapsed, run_dir=str(result.run_dir))
        return result.val_loss

    def _check_measured_caps(self, trial: optuna.Trial, measured: dict[str, list[float]]) -> None:
        """Stop at the first evaluation that shows the trial over a memory or latency cap."""
        caps = self.spec.settings.caps
        now = {"memory_gb": max(measured["memory_gb"]), "step_ms": latency(measured["step_ms"])}
        for name, cap in caps.items():
            if name == "memory_gb" or (name == "step_ms" and len(measured["step_ms"]) > 1):
                if now[name] > cap:
                    trial.set_constraint(name, now[name] - cap)
                    store(trial, **{name: now[name]})
                    self._reject(trial, f"{name} {now[name]:.3g} > cap {cap:g}")

    @staticmethod
    def _reject(trial: optuna.Trial, why: str) -> None:
        # Pruned with its constraint violation recorded: the sampler learns to avoid it, best_trials skips it.
        store(trial, rejected=why)
        raise optuna.TrialPruned(f"over a cap: {why}")
