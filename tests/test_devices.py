"""What mlxllm assumes about the device it runs on, with the device's facts given as inputs: the group's
layout for the memory check and the MFU peak, the GPUs' peaks, the BLAS warning, the benchmark's
units and executed FLOPs, and the CUDA source MLX 0.32 compiles. Nothing here needs a GPU."""

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from mlxllm import MlxllmError, RunConfig
from mlxllm.bench.flops import attention_fraction, executed_matmul_flops_per_token, visited_fraction
from mlxllm.bench.train import TINY_CONFIG
from mlxllm.bench.workers import rss_mb
from mlxllm.cpu.halves import SPLIT_MIN_LEN
from mlxllm.device import CUDA_TFLOPS, cuda_peak, tf32_enabled
from mlxllm.distributed import Group
from mlxllm.kernels.cuda import MLX_DEFAULT_HEADER, translation_unit
from mlxllm.kernels.fused import ROWS_PER_GROUP, inner_tile
from mlxllm.kernels.tiled import TILE_K, TILE_Q
from mlxllm.layout import Layout, group_peak, layout
from mlxllm.memory import check_fits, estimate_memory
from mlxllm.runstate import memory

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_configs

ROOT = Path(__file__).resolve().parent.parent

# The layouts of the issue: one machine with 4 GPUs under mlx.launch --backend nccl, and one Mac running
# 2 processes (ring). As distributed._join builds them for rank 0.
FOUR_GPUS = Group(rank=0, size=4, backend="nccl", local_rank=0, local_size=4)
MAC_TWO = Group(rank=0, size=2, backend="ring", local_rank=0, local_size=2)


def _run(tmp_path: Path) -> RunConfig:
    m, t, k = tiny_configs(tmp_path / "corpus.txt", tmp_path / "run", batch_size=8)
    return RunConfig(model=replace(m, vocab_size=256), tokenizer=k, train=t)


def _one_process(run: RunConfig, processes: int) -> dict[str, float]:
    """One process's estimate: its rows of the global batch."""
    t = run.train
    return estimate_memory(run.model, t.batch_size // processes, run.model.max_seq_len, t.dtype, t.grad_accum)


def test_four_gpus_under_nccl_each_hold_one_process_and_count_as_four_devices(tmp_path):
    where = layout(FOUR_GPUS, "cuda")
    assert (where.sharing, where.devices) == (1, 4)
    run = _run(tmp_path)
    seq = run.model.max_seq_len
    est, one = memory(run, seq, FOUR_GPUS, where), _one_process(run, 4)
    assert est == one  # one process's share on each GPU, not four of them
    gpu = (2.5 * one["total"], "GPU total_memory")  # one GPU holds one process's share, not four
    check_fits(est, run.train.batch_size // 4, seq, device=gpu)
    # The same group on this machine's CPU: its 4 processes share the RAM, and the check counts them all.
    shared = layout(FOUR_GPUS, "cpu")
    assert (shared.sharing, shared.devices) == (4, 1)
    with pytest.raises(MlxllmError, match="needs about"):
        check_fits(memory(run, seq, FOUR_GPUS, shared), run.train.batch_size // 4, seq, device=gpu)
    # MFU: the group's tokens/s over the peak of its devices.
    assert group_peak(1e14, where) == 4 * 1e14 and group_peak(1e14, shared) == 1e14


def test_two_processes_on_one_mac_share_its_gpu_memory_and_its_peak(tmp_path):
    where = layout(MAC_TWO, "metal")
    assert (where.sharing, where.devices) == (2, 1)
    run = _run(tmp_path)
    seq = run.model.max_seq_len
    est, one = memory(run, seq, MAC_TWO, where), _one_process(run, 2)
    assert est == {k: 2 * v for k, v in one.items()}
    room = (1.5 * one["total"], "GPU max_recommended_working_set_size")  # one share fits, two do not
    with pytest.raises(MlxllmError, match=r"Try train.batch_size=\d+ with train.grad_accum"):
        check_fits(est, run.train.batch_size // 2, seq, device=room)
    check_fits(one, run.train.batch_size // 2, seq, device=room)
    assert group_peak(5e12, where) == 5e12  # one GPU, however many processes use it
    # Two Macs with two processes each: two GPUs. NCCL only gives processes GPUs of their own on CUDA.
    assert layout(Group(size=4, backend="ring", local_size=2), "metal").devices == 2
    assert layout(Group(size=2, backend="nccl", local_size=2), "cpu").sharing == 2
    assert Layout().sharing == Layout().devices == 1


def test_a_group_of_one_counts_one_process_on_one_device(tmp_path):
    run = _run(tmp_path)
    seq = run.model.max_seq_len
    assert memory(run, seq) == memory(run, seq, Group(), layout(Group(), "cuda")) == _one_process(run, 1)


def test_cuda_peaks_are_matched_by_whole_names_and_fp32_runs_in_tf32(monkeypatch):
    a10 = cuda_peak("cuda:NVIDIA A10", "float32")
    assert a10 == (CUDA_TFLOPS["A10"][1] * 1e12, "NVIDIA A10 spec (TF32)")
    assert cuda_peak("cuda:NVIDIA A10G", "float32") is None  # not the A10: measured instead
    assert cuda_peak("cuda:NVIDIA A100-SXM4-80GB", "float32")[0] == CUDA_TFLOPS["A100"][1] * 1e12
    assert cuda_peak("cuda:NVIDIA H100 PCIe", "bfloat16")[0] == CUDA_TFLOPS["H100 PCIe"][2] * 1e12
    assert cuda_peak("cuda:NVIDIA H100 80GB HBM3", "bfloat16")[0] == CUDA_TFLOPS["H100"][2] * 1e12
    for name, (fp32, tf32, half) in CUDA_TFLOPS.items():
        gpu = f"cuda:NVIDIA GeForce {name}"
        assert cuda_peak(gpu, "float32", tf32=False)[0] == fp32 * 1e12 <= cuda_peak(gpu, "float32")[0] == tf32 * 1e12
        assert cuda_peak(gpu, "float16")[0] == half * 1e12
    monkeypatch.delenv("MLX_ENABLE_TF32", raising=False)
    assert tf32_enabled()
    monkeypatch.setenv("MLX_ENABLE_TF32", "0")
    assert not tf32_enabled()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS warning is for Linux only")
def test_the_reference_blas_warning_is_for_the_cpu_backend_only():
    code = (
        "import mlxllm\nfrom mlxllm.cpu import blas\n"
        "print(blas.warning('cpu') is not None, blas.warning('cuda') is None, blas.warning('metal') is None)"
    )
    env = {**os.environ, "MLXLLM_BLAS": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]


def test_max_rss_is_read_in_the_units_of_each_system():
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_mb(maxrss * 1024, "darwin") == rss_mb(maxrss, "linux") == maxrss / 1024  # bytes vs KiB


def _visited_by_brute_force(T: int, rows: int, keys: int) -> float:
    seen = np.zeros((T, T), bool)
    for q0 in range(0, T, rows):
        last = min(T, q0 + rows) - 1
        for k0 in range(0, last + 1, keys):  # every key tile that reaches the diagonal of these rows
            seen[q0 : q0 + rows, k0 : k0 + keys] = True
    return seen.mean()


@pytest.mark.parametrize("T", [7, 64, 130, 512, 700, 1300])
def test_tiled_and_fused_attention_compute_the_tiles_up_to_the_diagonal(T):
    for rows, keys in ((TILE_Q, TILE_K), (ROWS_PER_GROUP, inner_tile(64)), (ROWS_PER_GROUP, inner_tile(128))):
        assert visited_fraction(T, rows, keys) == pytest.approx(_visited_by_brute_force(T, rows, keys))


def test_executed_flops_follow_the_attention_that_ran_not_the_cpus_split():
    cfg = {**TINY_CONFIG, "seq_len": 2 * SPLIT_MIN_LEN}
    T = cfg["seq_len"]
    halves = executed_matmul_flops_per_token(cfg, "halves", "cpu")
    unfused = executed_matmul_flops_per_token(cfg, "fast", "cuda")  # fp32: MLX 0.32 runs it unfused
    square = 3 * cfg["n_layers"] * 2 * (2 * T * cfg["d_model"])  # forward + backward of the full square
    assert unfused - halves == pytest.approx(0.25 * square)
    assert executed_matmul_flops_per_token(cfg, "fast", "metal") == unfused
    cudnn = executed_matmul_flops_per_token(cfg, "fast", "cuda", "bfloat16")
    assert unfused - cudnn == pytest.approx(square * (1 - (T + 1) / (2 * T)))
    hd = cfg["d_model"] // cfg["n_heads"]
    assert attention_fraction("flash", "metal", T, hd) == visited_fraction(T, ROWS_PER_GROUP, inner_tile(hd))
    assert attention_fraction("flash", "cpu", T, hd) == visited_fraction(T, TILE_Q, TILE_K) == 1.0  # T < a tile
    short = {**cfg, "seq_len": SPLIT_MIN_LEN // 2}  # below the split, the halves path is the reference
    assert executed_matmul_flops_per_token(short, "halves", "cpu") == executed_matmul_flops_per_token(
        short, "reference", "cpu"
    )


def test_the_cuda_source_needs_no_inf_macro_which_mlx_0_32_no_longer_defines():
    assert "#define inf" not in MLX_DEFAULT_HEADER
    assert '#include "mlx/backend/cuda/device/utils.cuh"' in MLX_DEFAULT_HEADER
    for kind in ("forward", "dq", "dkv"):
        src = translation_unit(kind, mx.bfloat16, 64, True, 2, default_header="")
        assert not re.search(r"(?<![\w.])inf(?!\w)", src), kind  # MLX's old macro, used bare
