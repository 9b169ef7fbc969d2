"""The exact Metal source MLX generates for our kernels, compiled as C++ against tests/metal_shim.h and run on the CPU.

How the source is obtained: `mx.fast.metal_kernel` writes the full kernel (our header, the generated
`[[kernel]]` signature with buffers, template parameters and the builtins the body names, our body, and the
`[[host_name]]` instantiation) to stdout when called with verbose=True. On a machine without Metal it
only gets that far while `mx.export_function` traces (MLX records the kernel on a placeholder GPU stream),
so a subprocess exports a function that launches the three kernels with verbose=True, and we parse the
printed blocks. The only thing not in that text is MLX's `metal::utils()` prelude (metal_stdlib,
bfloat16_t), which the shim stands in for; the one edit is that each `threadgroup` array declaration becomes
the shim's MSHIM_THREADGROUP, which checks every access (see the header).

The kernels run at the production launch shape: fused.py's rows per threadgroup and inner tiles, on lengths
that are not multiples of either. The shim checks barriers, SIMD-group calls, threadgroup memory (size,
races, uninitialised reads) and runs under ASan and UBSan. Each check is shown to work on a broken copy of
a kernel (MUTANTS) that it must catch. Everything is one translation unit, compiled once per module; the
program runs the named kernels only, so each mutant runs in a process of its own.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlxllm  # noqa: F401  (must precede mlx.core)
from mlxllm.attention import reference_attention
from mlxllm.kernels.fused import ROWS_PER_GROUP, launch_grid

import mlx.core as mx
import numpy as np
import pytest

HERE = Path(__file__).parent
KINDS = ("forward", "dq", "dkv")

# (name, B, H, Hkv, L, D, causal, dtype, inner tile or None for fused.py's own)
CONFIGS = [
    ("gqa_causal_d32", 1, 4, 2, 37, 32, True, "float32", None),
    ("mha_full_d64", 2, 2, 2, 21, 64, False, "float32", None),
    ("mqa_causal_d128", 1, 2, 1, 19, 128, True, "float32", None),
    ("causal_d64_fp16", 1, 2, 1, 24, 64, True, "float16", None),
    ("causal_d64_bf16", 1, 2, 2, 24, 64, True, "bfloat16", None),
]
# 32 keys per tile at D = 128 puts the K/V tiles alone at 33 KB: what inner_tile() avoids.
OVERSIZE = ("oversize_d128_tile32", 1, 2, 1, 19, 128, True, "float32", 32)
TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 1e-1}

GENERATE = r"""
import json, sys
import mlxllm
import mlx.core as mx
from mlxllm.kernels.fused import fused_forward, fused_dq, fused_dkv
for i, (name, B, H, Hkv, L, D, causal, dtype, tile) in enumerate(json.loads(sys.argv[1])):
    dt = getattr(mx, dtype)
    q = mx.zeros((B, H, L, D), dt); k = mx.zeros((B, Hkv, L, D), dt); l = mx.zeros((B, H, L))
    kw = dict(scale=D ** -0.5, causal=causal, backend="metal", verbose=True)
    if tile is not None:
        kw["tile"] = tile
    def launch(q, k, v, do, lse, delta):
        o, l2 = fused_forward(q, k, v, **kw)
        dq = fused_dq(q, k, v, do, lse, delta, **kw)
        dk, dv = fused_dkv(q, k, v, do, lse, delta, **kw)
        return o, l2, dq, dk, dv
    mx.export_function(f"{sys.argv[2]}/{i}.mlxfn", launch, q, k, k, q, l, l)
"""

BLOCK = re.compile(r"Generated source code for `(\w+)`:\n```\n(.*?)\n```\n", re.S)
PARAM = re.compile(r"^\s*(const )?(?:device|constant) (\w+)\* (\w+) \[\[buffer\(\d+\)\]\]")
BUILTIN = re.compile(r"^\s*(?:uint3|uint) (\w+) \[\[(\w+)\]\]")
INSTANCE = re.compile(r"decltype\((\w+<[^>]*>)\)")


def generated_sources(configs: list, tmp: Path) -> list[dict[str, str]]:
    """{'forward': src, 'dq': src, 'dkv': src} per config, exactly as MLX prints them."""
    res = subprocess.run(
        [sys.executable, "-c", GENERATE, json.dumps(configs), str(tmp)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    blocks = BLOCK.findall(res.stdout)
    assert len(blocks) == 3 * len(configs), res.stdout[:2000]
    out: list[dict[str, str]] = [{} for _ in configs]
    for n, (name, src) in enumerate(blocks):
        out[n // 3][name.removeprefix("mlxllm_fa_")] = src
    return out


def shim_source(src: str) -> str:
    """`threadgroup T name[N];` (directly or through a macro defined as `threadgroup`) -> MSHIM_THREADGROUP."""
    aliases = ["threadgroup"] + re.findall(r"^#define (\w+) threadgroup\s*$", src, re.M)
    decl = re.compile(rf"^(\s*)(?:{'|'.join(aliases)})\s+(\w+)\s+(\w+)\[([^\]]+)\];", re.M)
    out = decl.sub(r"\1MSHIM_THREADGROUP(\2, \3, \4);", src)
    body = "\n".join(re.sub(r"//.*", "", line) for line in out.splitlines() if not line.startswith("#define"))
    assert not re.search(rf"\b({'|'.join(aliases)})\b", body), "a threadgroup use the shim cannot check"
    return out


def kernel_name(src: str) -> str:
    return INSTANCE.search(src).group(1).split("<")[0]


def edit(old: str, new: str):
    """An edit that replaces the one occurrence of `old` in a kernel's source."""

    def apply(src: str) -> str:
        assert src.count(old) == 1, old
        return src.replace(old, new)

    return apply


def drop_barrier(index: int):
    """An edit that removes the kernel's `index`-th FA_BARRIER() (0-based)."""

    def apply(src: str) -> str:
        cut = [m.start() for m in re.finditer(r"FA_BARRIER\(\);", src)][index]
        return src[:cut] + src[cut + len("FA_BARRIER();") :]

    return apply


FIRST_BARRIER = "FA_BARRIER();  // the previous tile is consumed (and qs is written on the first pass)"
# name -> (config, kind, edit, how it must be caught: ("error", stderr text) or ("values", output checked))
MUTANTS = {
    # missing barriers: the race check (uninitialised read, or write-after-read)
    "forward_read_before_load": (
        "gqa_causal_d32",
        "forward",
        drop_barrier(1),
        ("error", "which no thread has written"),
    ),
    "forward_overwrite_while_read": (
        "gqa_causal_d32",
        "forward",
        drop_barrier(0),
        ("error", "read since threadgroup_barrier"),
    ),
    "dkv_read_before_load": ("gqa_causal_d32", "dkv", drop_barrier(1), ("error", "which no thread has written")),
    # wrong arithmetic: the values (the mask one gives NaN rows, which must count as a failure)
    "forward_causal_mask": ("gqa_causal_d32", "forward", edit("j <= row", "j < row"), ("values", "out")),
    "dq_without_delta": ("gqa_causal_d32", "dq", edit("(dp - di)", "(dp)"), ("values", "dq")),
    # barriers and SIMD-group calls in divergent control flow
    "forward_divergent_barriers": (
        "gqa_causal_d32",
        "forward",
        edit(FIRST_BARRIER, "if (warp == 0) {\n      FA_BARRIER();\n    } else {\n      FA_BARRIER();\n    }"),
        ("error", "threads wait at different barriers"),
    ),
    "forward_divergent_simd": (
        "gqa_causal_d32",
        "forward",
        edit(
            "const float mn = FA_FMAX(m, FA_WARP_MAX(s));",
            "float wm;\n    if (lane < 16) {\n      wm = FA_WARP_MAX(s);\n    }"
            " else {\n      wm = FA_WARP_MAX(s);\n    }\n"
            "    const float mn = FA_FMAX(m, wm);",
        ),
        ("error", "lanes of one SIMD group call different SIMD-group functions"),
    ),
    "forward_early_return": (
        "gqa_causal_d32",
        "forward",
        edit("const int row = q0 + warp;", "const int row = q0 + warp;\n  if (row >= L) return;"),
        ("error", "returned while threads 0-31 wait at threadgroup_barrier"),
    ),
    # out-of-bounds reads: of a device buffer (ASan), of a threadgroup array (the shim's bounds check)
    "forward_unguarded_load": (
        "gqa_causal_d32",
        "forward",
        edit("const bool ok = k0 + r < L;", "const bool ok = true;"),
        ("error", "AddressSanitizer: heap-buffer-overflow"),
    ),
    "dkv_all_lanes_score": ("mqa_causal_d128", "dkv", edit("lane < BK && i < L", "i < L"), ("error", "out of bounds")),
    # over Metal's threadgroup memory limit
    **{
        f"{kind}_tile32_d128": (OVERSIZE[0], kind, lambda src: src, ("error", "more than Metal's limit of 32768"))
        for kind in KINDS
    },
}


def call_code(tag: str, src: str, sizes: dict[str, int], inputs: str, outputs: str, grid, tg) -> str:
    """C++ that, when `tag` is asked for, loads the inputs, runs the kernel over the grid and saves the outputs."""
    sig = src[src.index("[[kernel]] void") : src.index(") {\n")]
    buffers, builtins = [], []
    for line in sig.splitlines()[1:]:
        if m := PARAM.match(line):
            buffers.append((m.group(2), m.group(3), m.group(1) is None))
        elif m := BUILTIN.match(line):
            builtins.append(m.group(2))
    lines = [f'if (want(argc, argv, "{tag}")) {{']
    for ctype, name, is_output in buffers:
        if is_output:
            lines.append(f"  std::vector<{ctype}> {name}({sizes[name]});")
        else:
            lines.append(f'  auto {name} = mshim::load<{ctype}>("{inputs}_{name}.bin", {sizes[name]});')
    args = [f"{name}.data()" for _, name, _ in buffers] + [f"t.{b}" for b in builtins]
    lines.append(f'  mshim::dispatch("{tag}", {{{grid[0]}, {grid[1]}, {grid[2]}}}, {{{tg[0]}, {tg[1]}, {tg[2]}}},')
    lines.append(f"      [&](const mshim::Launch& t) {{ {INSTANCE.search(src).group(1)}({', '.join(args)}); }});")
    lines += [f'  mshim::save("{outputs}_{name}.bin", {name});' for _, name, out in buffers if out]
    return "\n".join(lines + ["}"])


MAIN = """
static bool want(int argc, char** argv, const char* tag) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], tag) == 0) return true;
  return false;
}
"""


def to_bytes(x: mx.array) -> bytes:
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16)).tobytes()
    return np.array(x).tobytes()


def from_file(path: Path, dtype: mx.Dtype, shape) -> mx.array:
    raw = path.read_bytes()
    if dtype == mx.bfloat16:
        return mx.array(np.frombuffer(raw, np.uint16).reshape(shape)).view(mx.bfloat16).astype(mx.float32)
    npd = {mx.float32: np.float32, mx.float16: np.float16}[dtype]
    return mx.array(np.frombuffer(raw, npd).reshape(shape).astype(np.float32))


def reference(B, H, Hkv, L, D, causal, dtype, seed):
    mx.random.seed(seed)
    dt = getattr(mx, dtype)
    q, do = (mx.random.normal((B, H, L, D)).astype(dt) for _ in range(2))
    k, v = (mx.random.normal((B, Hkv, L, D)).astype(dt) for _ in range(2))
    scale = D**-0.5
    qf, kf, vf, dof = (x.astype(mx.float32) for x in (q, k, v, do))

    def fn(q, k, v):
        return (reference_attention(q, k, v, scale=scale, causal=causal) * dof).sum()

    o = reference_attention(qf, kf, vf, scale=scale, causal=causal)
    s = (qf.reshape(B, Hkv, H // Hkv, L, D) * scale) @ kf[:, :, None].swapaxes(-1, -2)
    if causal:
        s = mx.where(mx.arange(L)[:, None] >= mx.arange(L)[None], s, -mx.inf)
    lse = mx.logsumexp(s, axis=-1).reshape(B, H, L)
    delta = (dof * o).sum(-1)
    dq, dk, dv = mx.grad(fn, argnums=(0, 1, 2))(qf, kf, vf)
    inputs = {
        "q": q,
        "k": k,
        "v": v,
        "dout": do,
        "lse": lse,
        "delta": delta,
        "dims": mx.array([B, H, Hkv, L], mx.int32),
        "scale": mx.array([scale], mx.float32),
    }
    return inputs, {"out": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def output_shapes(B, H, Hkv, L, D) -> dict[str, tuple[int, ...]]:
    return {"out": (B, H, L, D), "lse": (B, H, L), "dq": (B, H, L, D), "dk": (B, Hkv, L, D), "dv": (B, Hkv, L, D)}


def compiler() -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.fail("a C++ compiler (g++ or clang++, or $CXX) is required to compile the Metal source on the CPU")
    # -O0: with the sanitizers, -O1 triples the compile time (30 s on 2 cores) to save 2 s of run time.
    # -fno-sanitize-recover: a UBSan finding ends the run instead of scrolling past.
    return [
        cxx,
        "-std=c++20",
        "-O0",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        "-Wno-attributes",
        f"-I{HERE}",
    ]


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """Writes inputs, builds the one translation unit and returns (tmp, expected, run(tags, env) -> result)."""
    tmp = tmp_path_factory.mktemp("metal_shim")
    configs = CONFIGS + [OVERSIZE]
    sources = dict(zip([c[0] for c in configs], generated_sources(configs, tmp)))
    units, calls, expected = [], [], {}
    for c, (name, B, H, Hkv, L, D, causal, dtype, _) in enumerate(configs):
        inputs, expected[name] = reference(B, H, Hkv, L, D, causal, dtype, seed=c)
        for n, x in inputs.items():
            (tmp / f"{name}_{n}.bin").write_bytes(to_bytes(x))
        sizes = {n: x.size for n, x in inputs.items()}
        sizes.update({n: int(np.prod(s)) for n, s in output_shapes(B, H, Hkv, L, D).items()})
        runs = [(f"{name}_{kind}", kind, sources[name][kind]) for kind in KINDS if name != OVERSIZE[0]]
        for mutant, (cfg, kind, change, _) in MUTANTS.items():
            if cfg == name:  # renamed, so that it can live in the same translation unit
                src = sources[name][kind]
                runs.append((mutant, kind, change(src).replace(kernel_name(src), f"{kernel_name(src)}_{mutant}")))
        for tag, kind, src in runs:
            units.append(shim_source(src))
            grid, tg = launch_grid(L, Hkv if kind == "dkv" else H, B, ROWS_PER_GROUP)
            calls.append(call_code(tag, src, sizes, str(tmp / name), str(tmp / tag), grid, tg))
    cpp = tmp / "kernels.cpp"
    cpp.write_text(
        '#include "metal_shim.h"\n'
        + "\n".join(units)
        + MAIN
        + "int main(int argc, char** argv) {\n"
        + "\n".join(calls)
        + "\n}\n"
    )
    exe = tmp / "kernels"
    res = subprocess.run(compiler() + [str(cpp), "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]

    def run(tags: list[str], **env: str) -> subprocess.CompletedProcess:
        # Leak checking is off: the harness's buffers live until exit by design.
        full = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0", **env}
        return subprocess.run([str(exe), *tags], capture_output=True, text=True, timeout=300, env=full)

    return tmp, expected, run


@pytest.fixture(scope="module")
def production_run(shim):
    tmp, expected, run = shim
    res = run([f"{c[0]}_{kind}" for c in CONFIGS for kind in KINDS])
    assert res.returncode == 0, res.stderr[-5000:]
    return res.stdout


def result(tmp: Path, tag: str, name: str, dtype: str, shape) -> mx.array:
    return from_file(tmp / f"{tag}_{name}.bin", mx.float32 if name == "lse" else getattr(mx, dtype), shape)


def mismatch(got: mx.array, want: mx.array, tol: float) -> str | None:
    """Why `got` is not `want` within tol (NaN or inf counts), or None."""
    if not mx.all(mx.isfinite(got)).item():
        return "not finite"
    err = mx.abs(got - want).max().item()
    return None if err <= tol else f"max error {err:.3g} > {tol}"


OUTPUTS = {"forward": ("out", "lse"), "dq": ("dq",), "dkv": ("dk", "dv")}


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_kernels_match_reference(shim, production_run, config):
    tmp, expected, _ = shim
    name, B, H, Hkv, L, D, causal, dtype, _ = config
    shapes = output_shapes(B, H, Hkv, L, D)
    for kind in KINDS:
        for out in OUTPUTS[kind]:
            got = result(tmp, f"{name}_{kind}", out, dtype, shapes[out])
            why = mismatch(got, expected[name][out], TOL[dtype])
            assert why is None, f"{kind} {out}: {why}"


def test_threadgroup_memory_within_metal_limit(production_run):
    sizes = dict(re.findall(r"metal_shim: (\w+) threadgroup memory (\d+) bytes", production_run))
    assert set(sizes) == {f"{c[0]}_{kind}" for c in CONFIGS for kind in KINDS}
    print("\n".join(f"{tag}: {n} bytes" for tag, n in sizes.items()))
    assert all(0 < int(n) <= 32768 for n in sizes.values()), sizes


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_broken_kernel_is_caught(shim, mutant):
    tmp, expected, run = shim
    cfg, kind, _, (how, what) = MUTANTS[mutant]
    name, B, H, Hkv, L, D, causal, dtype, _ = next(c for c in CONFIGS + [OVERSIZE] if c[0] == cfg)
    res = run([mutant])
    if how == "error":
        assert res.returncode != 0 and what in res.stderr, f"not caught: rc {res.returncode}\n{res.stderr[-3000:]}"
        return
    assert res.returncode == 0, res.stderr[-3000:]
    got = result(tmp, mutant, what, dtype, output_shapes(B, H, Hkv, L, D)[what])
    assert mismatch(got, expected[name][what], TOL[dtype]) is not None, "the broken kernel's values pass the check"


def test_uninitialised_threadgroup_memory_reads_as_nan(shim):
    """With the race checks off, the kernel that reads its K tile before it is loaded yields NaN, not stale data."""
    tmp, expected, run = shim
    res = run(["forward_read_before_load"], MSHIM_RACE_CHECK="0")
    assert res.returncode == 0, res.stderr[-3000:]
    name, B, H, Hkv, L, D, *_ = CONFIGS[0]
    got = result(tmp, "forward_read_before_load", "out", "float32", (B, H, L, D))
    assert mismatch(got, expected[name]["out"], 1e-3) == "not finite"
