"""`mlxllm bench train`: real worker processes on a tiny config; what makes the comparison fair.

A discarded warm-up window, the order rotated every round, caches of each worker's own, fused AdamW
for PyTorch where it has one, and torch.compile over the whole PyTorch step as a row of its own.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from mlxllm.bench.train import IMPLS, TINY_CONFIG, rotated, run_benchmark
from mlxllm.bench.workers import TORCH_MODES, load_torch_reference, model_config
from mlxllm.errors import MlxllmError

import mlx.core as mx
import numpy as np
import pytest

MLX_IMPLS = ("mlxllm", "mlxllm-1stream", "mlx-plain")


def test_rotated_puts_each_item_first_in_turn() -> None:
    items = ["a", "b", "c"]
    assert [rotated(items, k) for k in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert rotated([], 3) == []


def test_every_pytorch_row_has_a_mode() -> None:
    assert "torch-compile-step" in IMPLS
    assert {i for i in IMPLS if i.startswith("torch")} == set(TORCH_MODES)


def test_bench_discards_warmup_rotates_order_and_isolates_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxllm.attention import resolve_attention
    from mlxllm.kernels import record_choice, resolve_auto

    # The user's cache records an attention choice other than the default: the workers must not see it.
    user_cache = tmp_path / "user-cache"
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(user_cache))
    default = resolve_auto()
    recorded = "fast" if default != "fast" else "halves"
    record_choice(recorded)
    assert resolve_attention("auto") == recorded  # in this process, the record is read

    out = tmp_path / "bench.json"
    steps, warmup, windows = 2, 1, 3
    results = run_benchmark(
        [TINY_CONFIG], steps=steps, warmup=warmup, windows=windows, json_path=out, impls=MLX_IMPLS, show=False
    )
    assert [r["impl"] for r in results] == list(MLX_IMPLS)
    for r in results:
        # The warm-up window is measured, then left out of the median.
        assert len(r["windows"]) == windows and r["warmup_window"]["steps_done"] == warmup + steps
        assert [w["steps_done"] for w in r["windows"]] == [warmup + steps * (k + 2) for k in range(windows)]
        assert r["tokens_per_s_windows"] == [w["tokens_per_s"] for w in r["windows"]]
        assert r["tokens_per_s"] == statistics.median(r["tokens_per_s_windows"])
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_mb"] > 0
        assert r["attention"] == default != recorded
        cache = Path(r["cache_dir"])
        assert user_cache not in (cache, *cache.parents) and not cache.exists()  # its own, removed afterwards
    assert len({r["cache_dir"] for r in results}) == len(results)
    for r in results[:2]:  # the compiled step, traced once: no recompiles in the measured windows
        assert r["traces"] == 1 and r["recompiles"] == 0

    # Each round's order, read from the workers' own clocks: rotated by one every round.
    for k in range(1 + windows):
        started = {r["impl"]: ([r["warmup_window"]] + r["windows"])[k]["started"] for r in results}
        assert sorted(started, key=started.get) == rotated(list(MLX_IMPLS), k)

    saved = json.loads(out.read_text())
    assert [r["impl"] for r in saved["results"]] == list(MLX_IMPLS) and saved["cpu"]


def test_bench_refuses_zero_windows() -> None:
    with pytest.raises(MlxllmError, match="--windows and --steps"):
        run_benchmark([TINY_CONFIG], windows=0, impls=("mlx-plain",), show=False)


def _torch_reference():
    pytest.importorskip("torch", reason="PyTorch (CPU) is not installed; .ci/run installs it")
    return load_torch_reference()


def test_pytorch_whole_step_compile_trains_as_eager_does() -> None:
    """The torch-compile-step row: the same model (parameter count), one graph for forward, backward and
    clipping plus PyTorch's own for the AdamW step, and the very losses and weights eager training has.
    Traced with aot_eager (the same Dynamo graphs, no Inductor code generation: seconds, not minutes)."""
    ref = _torch_reference()  # skips, saying why, where PyTorch is absent
    import torch
    from torch._dynamo.utils import counters

    cfg = {"vocab_size": 65, "n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 32, "batch_size": 2}
    cfg["hidden_dim"] = model_config(cfg).hidden_dim
    batches = [torch.from_numpy(np.random.default_rng(i).integers(0, 65, (2, 33))) for i in range(3)]
    eager = ref.make_trainer(cfg, mode="eager")
    torch._dynamo.reset()
    counters.clear()
    whole = ref.make_trainer(cfg, mode="compile-step", backend="aot_eager")
    assert sum(p.numel() for p in whole.model.parameters()) == model_config(cfg).num_params()
    want = [eager.step(b).item() for b in batches]
    got = [whole.step(b).item() for b in batches]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[0] != want[-1]  # it did train
    for (name, a), b in zip(eager.model.named_parameters(), whole.model.parameters()):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), atol=1e-6, err_msg=name)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["graph_break"])
    assert whole.optimizer == "foreach"  # traced; the fused kernel would be a graph break
    version = tuple(int(x) for x in torch.__version__.split(".")[:2])
    assert eager.optimizer == ("fused" if version >= (2, 4) else "foreach")
    with pytest.raises(ValueError, match="mode must be one of"):
        ref.make_trainer(cfg, mode="jit")


def test_pytorch_worker_runs_with_fused_adamw_and_its_own_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _torch_reference()
    monkeypatch.setenv("MLXLLM_CACHE_DIR", str(tmp_path / "user-cache"))
    (r,) = run_benchmark([TINY_CONFIG], steps=2, warmup=1, windows=1, impls=("torch-eager",), show=False)
    assert r["tokens_per_s"] > 0 and r["optimizer"] == "fused" and "fused AdamW" in r["note"]
    assert r["attention"] is None and r["recompiles"] is None
    assert Path(r["cache_dir"]).name == "mlxllm" and str(tmp_path) not in r["cache_dir"]
    assert os.environ["MLXLLM_CACHE_DIR"] == str(tmp_path / "user-cache")
    assert mx.array(1).item() == 1  # this process's MLX is untouched by the worker
