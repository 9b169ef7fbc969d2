"""The CUDA kernels executed on an NVIDIA GPU, against PyTorch's attention and its autograd gradients.

The source is exactly what `mx.fast.cuda_kernel` compiles (tests/cuda_tu.py), built to a cubin with nvcc for
the GPU's architecture and launched through CuPy with the parameters, grid and block that MLX would use for
fused.py's launch. The reference is torch's scaled_dot_product_attention in float64 on the CPU, so only
CuPy needs the GPU. Cases cover fp32/fp16/bf16, MHA/GQA/MQA, causal or not, lengths that are no multiple of
the tiles, and one-row sequences. The GPU tests skip, saying why, without CuPy, a GPU or nvcc.

What runs without a GPU: the launch parameters used here are checked against what fused.py hands to
`mx.fast.cuda_kernel` (its CPU build has no CUDA back-end, so the test records the call), and every
production kernel is compiled to a cubin whose ptxas report (registers, spills, shared memory) is checked.

As a script, `python tests/test_cuda_exec.py` prints a report: ptxas resources, the value and gradient
errors of every case, and compute-sanitizer's memcheck/racecheck/synccheck/initcheck on `--small` shapes.
"""

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a checkout: use the package beside tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import mlxllm  # noqa: E402,F401  (must precede mlx.core)
from mlxllm.kernels import fused  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from cuda_tu import (  # noqa: E402
    NVCC,
    STATIC_SHARED_LIMIT,
    KernelLaunch,
    compile_cubin,
    declared_shared_bytes,
    kernel_launch,
    mangled_name,
    ptxas_resources,
)

KINDS = ("forward", "dq", "dkv")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Relative to the largest reference value (absolute below 1). The kernels compute in fp32; what is left is the
# rounding of the fp16/bf16 results (2^-11, 2^-8) and of the O that delta is computed from: MLX's tiled
# kernels, the same arithmetic on the CPU, come to 4e-4 (fp16) and 4e-3 (bf16) on these cases.
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}

# (name, dtype, B, H, Hkv, L, D, causal)
CASES = [
    ("f32_d32_gqa_causal", "float32", 2, 4, 2, 77, 32, True),
    ("f32_d64_mha_full", "float32", 1, 4, 4, 130, 64, False),
    ("f32_d128_mqa_causal", "float32", 1, 4, 1, 45, 128, True),
    ("f16_d64_gqa_causal", "float16", 2, 8, 2, 203, 64, True),
    ("f16_d128_mha_full", "float16", 1, 2, 2, 61, 128, False),
    ("f16_d32_one_row", "float16", 1, 2, 1, 1, 32, True),
    ("bf16_d128_gqa_causal", "bfloat16", 1, 4, 2, 150, 128, True),
    ("bf16_d32_mqa_full", "bfloat16", 2, 4, 1, 33, 32, False),
    ("bf16_d64_mha_causal", "bfloat16", 1, 2, 2, 300, 64, True),
]
SMALL = [
    ("small_f32_d32_gqa_causal", "float32", 1, 4, 2, 37, 32, True),
    ("small_f16_d64_full", "float16", 1, 2, 1, 24, 64, False),
    ("small_bf16_d128_causal", "bfloat16", 1, 2, 2, 19, 128, True),
]
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


def find_compute_sanitizer() -> str | None:
    """On PATH, or where the CUDA toolkit that holds nvcc keeps it."""
    found = shutil.which("compute-sanitizer")
    if found or NVCC is None:
        return found
    bin_dir = Path(NVCC).resolve().parent
    for path in (bin_dir / "compute-sanitizer", bin_dir.parent / "compute-sanitizer" / "compute-sanitizer"):
        if path.is_file():
            return str(path)
    return None


COMPUTE_SANITIZER = find_compute_sanitizer()


def gpu_missing() -> str | None:
    """Why the kernels cannot run here, or None."""
    if NVCC is None:
        return "nvcc is not on PATH: cannot build the cubins"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed: it gives the reference"
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda13x, or cupy-cuda12x for CUDA 12)"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "CuPy sees no CUDA GPU"
    except Exception as exc:  # CUDARuntimeError without a driver or device
        return f"CuPy sees no CUDA GPU ({exc})"
    return None


def launches(case) -> dict[str, KernelLaunch]:
    _, dtype, B, H, Hkv, L, D, causal = case
    return {kind: kernel_launch(kind, DTYPES[dtype], B, H, Hkv, L, D, causal) for kind in KINDS}


class CudaKernels:
    """Every kernel the cases need: one cubin per dtype, loaded with CuPy."""

    def __init__(self, cases: list, workdir: Path) -> None:
        import cupy as cp

        self.cp = cp
        self.arch = "".join(map(str, cp.cuda.Device().compute_capability))
        units: dict[str, dict[str, str]] = {}
        for case in cases:
            for launch in launches(case).values():
                units.setdefault(case[1], {})[launch.kernel] = launch.source
        self.functions, self.resources = {}, {}
        for dtype, by_name in units.items():
            path = workdir / f"kernels_{dtype}.cubin"
            self.resources.update(ptxas_resources(compile_cubin(list(by_name.values()), path, self.arch)))
            module, cubin = cp.RawModule(path=str(path)), path.read_bytes()
            for name in by_name:
                self.functions[name] = module.get_function(mangled_name(cubin, name))

    def run(self, launch: KernelLaunch, buffers: dict) -> dict:
        """Launches with `buffers` (CuPy arrays by parameter name; outputs are allocated, filled with NaN bits)."""
        cp = self.cp
        outs = {}
        for (_, name, _), shape, dtype in zip(
            [p for p in launch.params if p[2]], launch.output_shapes, launch.output_dtypes
        ):
            outs[name] = cp.full(int(np.prod(shape)) * dtype.size, 0xFF, cp.uint8)  # NaN in fp32/fp16/bf16
        args = tuple(outs[n] if is_out else buffers[n] for _, n, is_out in launch.params)
        self.functions[launch.kernel](launch.grid, launch.block, args)
        cp.cuda.Device().synchronize()
        return outs


def to_device(cp, t):
    """A contiguous torch CPU tensor's bytes as a CuPy array (dtype does not matter to the kernel's pointer)."""
    import torch

    return cp.asarray(t.contiguous().view(torch.uint8).numpy())


def from_device(cp, buf, dtype: str, shape):
    import torch

    return torch.from_numpy(cp.asnumpy(buf)).view(getattr(torch, dtype)).reshape(shape).double()


def torch_reference(q, k, v, do, causal: bool, scale: float):
    """(O, lse, dQ, dK, dV) in float64: SDPA on K/V heads repeated for each query head, and autograd."""
    import torch
    import torch.nn.functional as F

    g = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ke, ve = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
    o = F.scaled_dot_product_attention(qd, ke, ve, is_causal=causal, scale=scale)
    (o * do.double()).sum().backward()
    s = (qd @ ke.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return {"out": o.detach(), "lse": torch.logsumexp(s, -1).detach(), "dq": qd.grad, "dk": kd.grad, "dv": vd.grad}


def run_case(kernels: CudaKernels, case, seed: int = 0) -> dict[str, float]:
    """Forward, then dQ and dK/dV from the kernel's own O and lse; the relative error of each output."""
    import torch

    cp = kernels.cp
    name, dtype, B, H, Hkv, L, D, causal = case
    scale = D**-0.5
    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q, do = (torch.randn(B, H, L, D, generator=gen).to(dt) for _ in range(2))
    k, v = (torch.randn(B, Hkv, L, D, generator=gen).to(dt) for _ in range(2))
    ref = torch_reference(q, k, v, do, causal, scale)
    plan = launches(case)
    buffers = {
        "q": to_device(cp, q),
        "k": to_device(cp, k),
        "v": to_device(cp, v),
        "dout": to_device(cp, do),
        "dims": cp.asarray(np.array([B, H, Hkv, L], np.int32)),
        "scale": cp.asarray(np.array([scale], np.float32)),
    }
    fwd = kernels.run(plan["forward"], buffers)
    o = from_device(cp, fwd["out"], dtype, (B, H, L, D))
    lse = from_device(cp, fwd["lse"], "float32", (B, H, L))
    # As fused.py's backward: delta = rowsum(dO * O) in fp32, from O as stored.
    delta = (do.float() * o.to(dt).float()).sum(-1)
    buffers.update(lse=to_device(cp, lse.float()), delta=to_device(cp, delta))
    got = {"out": o, "lse": lse}
    dq = kernels.run(plan["dq"], buffers)
    got["dq"] = from_device(cp, dq["dq"], dtype, (B, H, L, D))
    dkv = kernels.run(plan["dkv"], buffers)
    got["dk"] = from_device(cp, dkv["dk"], dtype, (B, Hkv, L, D))
    got["dv"] = from_device(cp, dkv["dv"], dtype, (B, Hkv, L, D))
    errors = {}
    for key, value in got.items():
        if not bool(torch.isfinite(value).all()):
            errors[key] = float("inf")
        else:
            # Relative to the largest reference value, absolute below 1: a one-key row has dQ = dK = 0.
            errors[key] = float((value - ref[key]).abs().max() / ref[key].abs().max().clamp_min(1.0))
    return errors


# ---- Without a GPU ----

LAUNCH_SHAPES = [
    (2, 4, 2, 37, 32, True, mx.float32),
    (1, 2, 2, 21, 64, False, mx.bfloat16),
    (1, 4, 1, 19, 128, True, mx.float16),
]


def test_launch_matches_what_fused_passes_to_mlx(monkeypatch):
    """Names, order, arrays, output shapes, template arguments and launch shape, as fused.py gives them to MLX."""
    calls = []

    def cuda_kernel(**spec):
        def launch(**kw):
            calls.append((spec, kw))
            return [mx.zeros(s, d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]

        return launch

    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_kernel)
    fused.build_kernel.cache_clear()
    try:
        for B, H, Hkv, L, D, causal, dtype in LAUNCH_SHAPES:
            mx.random.seed(L)
            q, do = (mx.random.normal((B, H, L, D)).astype(dtype) for _ in range(2))
            k, v = (mx.random.normal((B, Hkv, L, D)).astype(dtype) for _ in range(2))
            lse, delta = mx.random.normal((B, H, L)), mx.random.normal((B, H, L))
            kw = dict(scale=D**-0.5, causal=causal, backend="cuda")
            calls.clear()
            fused.fused_forward(q, k, v, **kw)
            fused.fused_dq(q, k, v, do, lse, delta, **kw)
            fused.fused_dkv(q, k, v, do, lse, delta, **kw)
            arrays = {
                "q": q,
                "k": k,
                "v": v,
                "dout": do,
                "lse": lse,
                "delta": delta,
                "dims": mx.array([B, H, Hkv, L], mx.int32),
                "scale": mx.array([D**-0.5], mx.float32),
            }
            assert [spec["name"] for spec, _ in calls] == [f"mlxllm_fa_{kind}" for kind in KINDS]
            for kind, (spec, call) in zip(KINDS, calls):
                plan = kernel_launch(kind, dtype, B, H, Hkv, L, D, causal)
                assert spec["header"] in plan.source and spec["source"] in plan.source
                assert [n for _, n, _ in plan.params] == spec["input_names"] + spec["output_names"]
                for name, given in zip(spec["input_names"], call["inputs"]):
                    assert given.dtype == arrays[name].dtype and mx.array_equal(given, arrays[name]).item(), name
                assert tuple(call["template"]) == plan.template
                assert [tuple(s) for s in call["output_shapes"]] == list(plan.output_shapes)
                assert tuple(call["output_dtypes"]) == plan.output_dtypes
                assert tuple(call["threadgroup"]) == plan.block
                assert tuple(-(-g // b) for g, b in zip(call["grid"], call["threadgroup"])) == plan.grid
    finally:
        fused.build_kernel.cache_clear()


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: cannot build the cubins")
def test_production_kernels_build_to_cubin_without_spills(tmp_path):
    """Every kind, head dim and dtype at the production tiles, for sm_90 (the H100/H200)."""
    plans = [
        kernel_launch(kind, dt, 1, 4, 2, 64, D, True)
        for dt in DTYPES.values()
        for D in fused.HEAD_DIMS
        for kind in KINDS
    ]
    report = compile_cubin([p.source for p in plans], tmp_path / "all.cubin", "90")
    resources = ptxas_resources(report)
    cubin = (tmp_path / "all.cubin").read_bytes()
    for p in plans:
        r = resources[mangled_name(cubin, p.kernel)]
        d = dict(p.template)["D"]
        print(
            f"{p.kernel}: {r['registers']} registers, {r['spill_stores']}/{r['spill_loads']} bytes spilled "
            f"(stores/loads), {r['stack']} bytes stack, {r['smem']} bytes shared"
        )
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, p.kernel
        assert r["smem"] == declared_shared_bytes(p.kind, d) <= STATIC_SHARED_LIMIT, p.kernel


# ---- On a GPU ----


@pytest.fixture(scope="module")
def cuda_kernels(tmp_path_factory):
    reason = gpu_missing()
    if reason:
        pytest.skip(reason)
    return CudaKernels(CASES, tmp_path_factory.mktemp("cuda_exec"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_torch(cuda_kernels, case):
    errors = run_case(cuda_kernels, case)
    print(case[0], {k: f"{e:.2e}" for k, e in errors.items()})
    bad = {k: e for k, e in errors.items() if not e <= TOL[case[1]]}
    assert not bad, f"relative errors over {TOL[case[1]]}: {bad}"


def sanitize(tool: str) -> subprocess.CompletedProcess:
    cmd = [COMPUTE_SANITIZER, "--tool", tool, "--error-exitcode", "99", sys.executable, __file__, "--small"]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("tool", SANITIZER_TOOLS)
def test_small_shapes_pass_compute_sanitizer(tool):
    reason = gpu_missing() or (None if COMPUTE_SANITIZER else "compute-sanitizer is not on PATH")
    if reason:
        pytest.skip(reason)
    res = sanitize(tool)
    out = res.stdout + res.stderr
    print(out[-3000:])
    assert res.returncode == 0 and "small run passed" in out, out[-5000:]


# ---- As a script ----


def report(cases: list, with_sanitizer: bool) -> int:
    reason = gpu_missing()
    if reason:
        print(f"cannot run the CUDA kernels: {reason}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        kernels = CudaKernels(cases, Path(tmp))
        print(f"GPU sm_{kernels.arch}; ptxas resources:")
        for entry, r in sorted(kernels.resources.items()):
            print(
                f"  {entry[:90]}: {r['registers']} regs, spills {r['spill_stores']}/{r['spill_loads']} B, "
                f"stack {r['stack']} B, smem {r['smem']} B"
            )
        failures = 0
        for case in cases:
            errors = run_case(kernels, case)
            bad = [k for k, e in errors.items() if not e <= TOL[case[1]]]
            failures += bool(bad)
            line = " ".join(f"{k} {e:.2e}" for k, e in errors.items())
            print(f"{'FAIL' if bad else 'ok  '} {case[0]}: relative errors {line} (tol {TOL[case[1]]})")
    if with_sanitizer:
        if COMPUTE_SANITIZER is None:
            print("compute-sanitizer is not on PATH: sanitizer runs skipped")
        for tool in SANITIZER_TOOLS if COMPUTE_SANITIZER else ():
            res = sanitize(tool)
            failures += res.returncode != 0
            tail = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()][-6:]
            print(f"compute-sanitizer --tool {tool}: exit {res.returncode}\n    " + "\n    ".join(tail))
    if cases is SMALL and not failures:
        print("small run passed")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the CUDA attention kernels on the GPU and report.")
    parser.add_argument("--small", action="store_true", help="small shapes only, no sanitizer (what it runs under)")
    args = parser.parse_args()
    sys.exit(report(SMALL if args.small else CASES + SMALL, with_sanitizer=not args.small))
