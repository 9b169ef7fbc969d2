"""The benchmark's workers: one process per implementation, driven over stdin/stdout with JSON lines.

Each worker builds its model and step, warms up (compiles), then runs measured windows on request.
This file is loaded by its path (not imported as part of the package), so that a PyTorch worker
never imports mlxllm, MLX or the BLAS mlxllm loads: two BLAS thread pools in one process would
compete for the same cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COMPILED_MLX = ("mlxllm", "mlxllm-1stream")
TORCH_MODES = {"torch-eager": "eager", "torch-compile": "compile", "torch-compile-step": "compile-step"}
TORCH_REFERENCE = Path(__file__).resolve().with_name("torch_reference.py")


def model_config(cfg: dict[str, Any]) -> Any:
    """The benchmark config's mlxllm ModelConfig (imports mlxllm: MLX workers and the driver only)."""
    from mlxllm.config import ModelConfig

    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        n_layers=cfg["n_layers"],
        d_model=cfg["d_model"],
        n_heads=cfg["n_heads"],
        max_seq_len=cfg["seq_len"],
        attention=cfg.get("attention", "auto"),
    )


def rss_mb(maxrss: int, platform: str = sys.platform) -> float:
    """getrusage's ru_maxrss in MiB: macOS reports bytes, Linux KiB."""
    return maxrss / 2**20 if platform == "darwin" else maxrss / 1024


def _rss_mb() -> float:
    import resource

    return rss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _compiled_runner(model: Any, optimizer: Any, tc: Any, split: Any, next_batch: Any, counting_loss_fn: Any):
    """run(n, batch) of mlxllm's compiled step, as training runs it; `counting_loss_fn` stands in for
    mlxllm.step.loss_fn, which the step looks up when it traces."""
    from mlxllm import step as step_mod
    from mlxllm.memory import configure_cache
    from mlxllm.schedule import lr_at

    import mlx.core as mx

    configure_cache()  # as mlxllm.trainer.train does
    step_mod.loss_fn = counting_loss_fn
    step_fn = step_mod.make_step(model, optimizer, tc, split=split)

    def run(n: int, batch):
        if n == 0:
            return batch
        with split:  # its BLAS threads, as training opens it
            for i in range(n):
                optimizer.learning_rate = lr_at(tc, i, 0.5)
                loss, _ = step_fn(batch)
                mx.async_eval(loss, model.parameters(), optimizer.state)
                batch = next_batch()  # built on the host while the step runs
            # The whole last step, not just its loss: the loss is ready after the forward, and the
            # backward and update left running would fall outside this window, into the next
            # worker's (another process, on the same cores).
            mx.eval(loss, model.parameters(), optimizer.state)
        return batch

    return run


def _plain_runner(model: Any, optimizer: Any, tc: Any, next_batch: Any, counting_loss_fn: Any):
    """run(n, batch) of a plain MLX loop: value_and_grad, clipping, the optimizer's update, mx.eval."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    grad_fn = nn.value_and_grad(model, counting_loss_fn)

    def run(n: int, batch):
        for _ in range(n):  # mx.eval every step: nothing is left pending
            loss, grads = grad_fn(model, batch)
            grads, _ = optim.clip_grad_norm(grads, tc.grad_clip)
            optimizer.update(model, grads)
            mx.eval(loss, model.parameters(), optimizer.state)
            batch = next_batch()
        return batch

    return run


def _mlx_worker(impl: str, cfg: dict[str, Any], dtype: str):
    import mlxllm  # noqa: F401 - first: it loads the optimized BLAS before mlx.core

    # isort: split
    from mlxllm import step as step_mod
    from mlxllm.attention import resolve_attention
    from mlxllm.config import TrainConfig
    from mlxllm.cpu.precision import compute_dtype
    from mlxllm.device import backend, device_name
    from mlxllm.kernels import Shape
    from mlxllm.model import build_model

    import mlx.core as mx
    import numpy as np

    mc = model_config(cfg)
    compiled = impl in COMPILED_MLX
    computed, why = compute_dtype(dtype, backend())  # train.dtype = dtype computes in this, as training does
    tc = TrainConfig(
        batch_size=cfg["batch_size"],
        seq_len=cfg["seq_len"],
        compile=compiled,
        cpu_streams=1 if impl == "mlxllm-1stream" else 0,
        dtype=computed,
    )
    traces, calls, real_loss_fn = [0], [0], step_mod.loss_fn
    split = step_mod.cpu_split(tc, mc)  # a trace calls loss_fn once per stream the step is split over
    n_streams = len(split.streams) if compiled else 1

    def counting_loss_fn(model, batch):
        calls[0] += 1  # runs on every call uncompiled, only while tracing when compiled
        traces[0] = calls[0] // n_streams
        return real_loss_fn(model, batch)

    mx.random.seed(0)
    model = build_model(mc, seed=0)
    optimizer = step_mod.make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    rng = np.random.default_rng(0)
    # The compiled step's layout is the training loop's, (grad_accum, B, T + 1); the plain loop's (B, T + 1).
    rows = (1, cfg["batch_size"], cfg["seq_len"] + 1) if compiled else (cfg["batch_size"], cfg["seq_len"] + 1)

    def next_batch():
        return mx.array(rng.integers(0, mc.vocab_size, rows, dtype=np.int32))

    if compiled:
        run = _compiled_runner(model, optimizer, tc, split, next_batch, counting_loss_fn)
    else:
        run = _plain_runner(model, optimizer, tc, next_batch, counting_loss_fn)

    def memory() -> dict[str, float]:
        return {
            "peak_mem_mb": mx.get_peak_memory() / 2**20,
            "active_mem_mb": mx.get_active_memory() / 2**20,
            "max_rss_mb": _rss_mb(),
        }

    shape = Shape(device_name(), tc.dtype, mc.head_dim, training=True)
    facts = {
        "attention": resolve_attention(mc.attention, shape),
        "backend": shape.backend,
        "compute_dtype": computed,
        "dtype_note": why,
    }
    return run, next_batch, traces, memory, facts


def load_torch_reference() -> Any:
    """The PyTorch reference model's module (torch_reference.py, loaded by path: it imports torch, which
    mlxllm itself never does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_reference", TORCH_REFERENCE)
    torch_reference = importlib.util.module_from_spec(spec)
    sys.modules["torch_reference"] = torch_reference  # Dynamo looks traced code's module up by name
    spec.loader.exec_module(torch_reference)
    return torch_reference


def _torch_worker(impl: str, cfg: dict[str, Any], dtype: str):
    import numpy as np
    import torch

    torch_reference = load_torch_reference()
    trainer = torch_reference.make_trainer(cfg, mode=TORCH_MODES[impl], dtype=dtype)  # cfg carries hidden_dim
    step = trainer.step
    rng = np.random.default_rng(0)
    B, T = cfg["batch_size"], cfg["seq_len"]
    traces = [0]  # torch.compile's own counter is read below
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        counters = None

    def next_batch():
        return torch.from_numpy(rng.integers(0, cfg["vocab_size"], (B, T + 1), dtype=np.int64))

    def run(n: int, batch):
        if n == 0:
            return batch
        for _ in range(n):
            loss = step(batch)
            batch = next_batch()
        loss.item()
        if counters is not None and impl != "torch-eager":
            traces[0] = int(sum(counters["stats"].get(k, 0) for k in ("unique_graphs",)))
        return batch

    def memory() -> dict[str, float]:
        return {"peak_mem_mb": float("nan"), "active_mem_mb": float("nan"), "max_rss_mb": _rss_mb()}

    return run, next_batch, traces, memory, {"optimizer": trainer.optimizer, "compute_dtype": dtype}


def worker_main(impl: str, cfg: dict[str, Any], warmup: int, dtype: str = "float32") -> None:
    """Build, warm up, then answer 'window N' / 'memory' / 'quit' lines on stdin with JSON on stdout.
    `dtype`: mlxllm's train.dtype, or PyTorch's autocast dtype (float32: none)."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    t0 = time.perf_counter()
    build = _torch_worker if impl.startswith("torch") else _mlx_worker
    run, next_batch, traces, memory, facts = build(impl, cfg, dtype)
    batch = next_batch()
    batch = run(1, batch)  # the first step compiles
    first, first_traces = time.perf_counter() - t0, traces[0]
    batch = run(max(0, warmup - 1), batch)
    out.write(
        json.dumps(
            {
                "ready": True,
                "first_step_s": first,
                "first_traces": first_traces,
                "traces": traces[0],
                "cache_dir": os.environ.get("MLXLLM_CACHE_DIR"),
                **facts,
                **memory(),
            }
        )
        + "\n"
    )
    out.flush()
    done = warmup
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        n = int(cmd[1])
        started = time.time()  # the wall clock, comparable across the workers
        t = time.perf_counter()
        c = time.process_time()
        batch = run(n, batch)
        dt = time.perf_counter() - t
        done += n
        reply = {
            "started": started,
            "seconds": dt,
            "steps": n,
            "tokens_per_s": n * cfg["batch_size"] * cfg["seq_len"] / dt,
            "cpu_per_wall": (time.process_time() - c) / dt,
            "traces": traces[0],
            "steps_done": done,
            **memory(),
        }
        out.write(json.dumps(reply) + "\n")
        out.flush()


def isolated_env(cache: Path) -> dict[str, str]:
    """The environment of a worker whose caches are all its own, under `cache`: it neither reads the
    user's (a recorded attention choice in MLXLLM_CACHE_DIR would change what 'auto' runs; Inductor's
    compiled kernels from an earlier run would hide PyTorch's compile time) nor another worker's."""
    return {
        **os.environ,
        "MLXLLM_CACHE_DIR": str(cache / "mlxllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TRITON_CACHE_DIR": str(cache / "triton"),
    }


class Worker:
    def __init__(self, impl: str, cfg: dict[str, Any], warmup: int, dtype: str = "float32"):
        """A worker process of `impl` (one of train.IMPLS) on the benchmark config `cfg`, warmed up by
        `warmup` steps, training in `dtype` (see worker_main)."""
        self.impl, self.dtype = impl, dtype
        self.name = impl if dtype == "float32" else f"{impl} {dtype}"  # unique among a config's workers
        self.cache = Path(tempfile.mkdtemp(prefix=f"mlxllm-bench-{impl}-{dtype}-"))
        # This file by its path: importing it as mlxllm.bench.workers would import the package (see above).
        boot = (
            "import importlib.util as u, sys; s = u.spec_from_file_location('mlxllm_bench_worker', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.main(sys.argv[2:])"
        )
        cmd = [
            sys.executable,
            "-c",
            boot,
            str(Path(__file__).resolve()),
            "--worker",
            impl,
            json.dumps(cfg),
            str(warmup),
            dtype,
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=isolated_env(self.cache)
        )
        self.ready: dict[str, Any] | None = None

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker exited (code {self.proc.wait()}); see its output above")
        return json.loads(line)

    def wait_ready(self) -> dict[str, Any]:
        self.ready = self._reply()
        return self.ready

    def window(self, steps: int) -> dict[str, Any]:
        self.proc.stdin.write(f"window {steps}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.cache, ignore_errors=True)


def main(argv: list[str]) -> None:
    """A worker process: `--worker IMPL CONFIG_JSON WARMUP DTYPE`."""
    impl, cfg, warmup, dtype = argv[1], json.loads(argv[2]), int(argv[3]), argv[4]
    worker_main(impl, cfg, warmup, dtype)
