"""The exact Metal source MLX generates for our kernels, compiled as C++ against tests/metal_shim.h and run on the CPU.

How the source is obtained: `mx.fast.metal_kernel` writes the full kernel (our header, the generated
`[[kernel]]` signature with buffers, template parameters and the builtins the body names, our body, and the
`[[host_name]]` instantiation) to stdout when called with verbose=True. On a machine without Metal it
only gets that far while `mx.export_function` traces (MLX records the kernel on a placeholder GPU stream),
so a subprocess exports a function that launches the three kernels with verbose=True, and we parse the
printed blocks. The only thing not in that text is MLX's `metal::utils()` prelude (metal_stdlib,
bfloat16_t), which the shim stands in for.

All kernels (plus two deliberately broken ones) go into one translation unit: one g++ run, one program run.
"""

import mlxllm  # noqa: F401  (must precede mlx.core)

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxllm.kernels.fused import launch_grid
from mlxllm.attention import reference_attention

HERE = Path(__file__).parent
ROWS = 2  # SIMD groups per threadgroup in the test: 64 fibers per group keeps the CPU run short

# (name, B, H, Hkv, L, D, causal, dtype)
CONFIGS = [
    ("gqa_causal_d32", 1, 4, 2, 37, 32, True, "float32"),
    ("mha_full_d64", 2, 2, 2, 21, 64, False, "float32"),
    ("mqa_causal_d128", 1, 2, 1, 19, 128, True, "float32"),
    ("causal_d64_fp16", 1, 2, 1, 24, 64, True, "float16"),
    ("causal_d64_bf16", 1, 2, 2, 24, 64, True, "bfloat16"),
]

GENERATE = r"""
import json, sys
import mlxllm
import mlx.core as mx
from mlxllm.kernels.fused import fused_forward, fused_dq, fused_dkv
for i, (name, B, H, Hkv, L, D, causal, dtype) in enumerate(json.loads(sys.argv[1])):
    dt = getattr(mx, dtype)
    q = mx.zeros((B, H, L, D), dt); k = mx.zeros((B, Hkv, L, D), dt); l = mx.zeros((B, H, L))
    kw = dict(scale=D ** -0.5, causal=causal, backend="metal", rows=int(sys.argv[2]), verbose=True)
    def launch(q, k, v, do, lse, delta):
        o, l2 = fused_forward(q, k, v, **kw)
        dq = fused_dq(q, k, v, do, lse, delta, **kw)
        dk, dv = fused_dkv(q, k, v, do, lse, delta, **kw)
        return o, l2, dq, dk, dv
    mx.export_function(f"{sys.argv[3]}/{i}.mlxfn", launch, q, k, k, q, l, l)
"""

BLOCK = re.compile(r"Generated source code for `(\w+)`:\n```\n(.*?)\n```\n", re.S)
PARAM = re.compile(r"^\s*(const )?(?:device|constant) (\w+)\* (\w+) \[\[buffer\(\d+\)\]\]")
BUILTIN = re.compile(r"^\s*(?:uint3|uint) (\w+) \[\[(\w+)\]\]")
INSTANCE = re.compile(r"decltype\((\w+<[^>]*>)\)")


def generated_sources(tmp: Path) -> list[dict[str, str]]:
    """{'forward': src, 'dq': src, 'dkv': src} per config, exactly as MLX prints them."""
    res = subprocess.run(
        [sys.executable, "-c", GENERATE, json.dumps(CONFIGS), str(ROWS), str(tmp)],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    blocks = BLOCK.findall(res.stdout)
    assert len(blocks) == 3 * len(CONFIGS), res.stdout[:2000]
    kinds = {"mlxllm_fa_forward": "forward", "mlxllm_fa_dq": "dq", "mlxllm_fa_dkv": "dkv"}
    out = [{} for _ in CONFIGS]
    for n, (name, src) in enumerate(blocks):
        out[n // 3][kinds[name]] = src
    return out


def break_source(src: str, old: str, new: str, suffix: str) -> str:
    """A copy of `src` with one edit and the kernel renamed, so it can live in the same translation unit."""
    assert old in src
    name = INSTANCE.search(src).group(1).split("<")[0]
    return src.replace(old, new, 1).replace(name, name + suffix)


def remove_second_barrier(src: str) -> str:
    """Drop the barrier between loading a K/V tile and reading it."""
    first = src.index("FA_BARRIER();  // the previous tile")
    second = src.index("FA_BARRIER();", first + 1)
    edited = src[:second] + src[second + len("FA_BARRIER();") :]
    name = INSTANCE.search(src).group(1).split("<")[0]
    return edited.replace(name, name + "_nobarrier")


def call_code(tag: str, src: str, shapes: dict[str, tuple[str, int]], grid, tg, outdir: str) -> str:
    """C++ that loads the inputs, runs the kernel over the grid with the shim, and saves the outputs."""
    sig = src[src.index("[[kernel]] void") : src.index(") {\n")]
    buffers, builtins = [], []
    for line in sig.splitlines()[1:]:
        if m := PARAM.match(line):
            buffers.append((m.group(2), m.group(3), m.group(1) is None))
        elif m := BUILTIN.match(line):
            builtins.append(m.group(2))
    fn = INSTANCE.search(src).group(1)
    lines = ["{"]
    for ctype, name, is_output in buffers:
        n = shapes[name][1]
        if is_output:
            lines.append(f"  std::vector<{ctype}> {name}({n});")
        else:
            lines.append(f'  auto {name} = mshim::load<{ctype}>("{outdir}/{tag}_{name}.bin", {n});')
    args = [f"{name}.data()" for _, name, _ in buffers] + [f"t.{b}" for b in builtins]
    lines.append(f"  mshim::dispatch({{{grid[0]}, {grid[1]}, {grid[2]}}}, {{{tg[0]}, {tg[1]}, {tg[2]}}},")
    lines.append(f"      [&](const mshim::Launch& t) {{ {fn}({', '.join(args)}); }});")
    for _, name, is_output in buffers:
        if is_output:
            lines.append(f'  mshim::save("{outdir}/{tag}_{name}.bin", {name});')
    lines.append("}")
    return "\n".join(lines)


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
    f32 = [x.astype(mx.float32) for x in (q, k, v, do)]
    qf, kf, vf, dof = f32

    def fn(q, k, v):
        return (reference_attention(q, k, v, scale=scale, causal=causal) * dof).sum()

    o = reference_attention(qf, kf, vf, scale=scale, causal=causal)
    G = H // Hkv
    s = (qf.reshape(B, Hkv, G, L, D) * scale) @ kf[:, :, None].swapaxes(-1, -2)
    if causal:
        s = mx.where(mx.arange(L)[:, None] >= mx.arange(L)[None], s, -mx.inf)
    lse = mx.logsumexp(s, axis=-1).reshape(B, H, L)
    delta = (dof * o).sum(-1)
    dq, dk, dv = mx.grad(fn, argnums=(0, 1, 2))(qf, kf, vf)
    inputs = {"q": q, "k": k, "v": v, "dout": do, "lse": lse, "delta": delta,
              "dims": mx.array([B, H, Hkv, L], mx.int32), "scale": mx.array([scale], mx.float32)}
    expected = {"out": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    return inputs, expected


@pytest.fixture(scope="module")
def shim_run(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.fail("g++ is required to compile the Metal source on the CPU")
    tmp = tmp_path_factory.mktemp("metal_shim")
    sources = generated_sources(tmp)
    units, calls, expected = [], [], {}
    for c, ((name, B, H, Hkv, L, D, causal, dtype), srcs) in enumerate(zip(CONFIGS, sources)):
        inputs, exp = reference(B, H, Hkv, L, D, causal, dtype, seed=c)
        expected[name] = exp
        shapes = {n: (None, x.size) for n, x in inputs.items()}
        shapes.update({"out": (None, B * H * L * D), "lse": (None, B * H * L), "dq": (None, B * H * L * D),
                       "dk": (None, B * Hkv * L * D), "dv": (None, B * Hkv * L * D)})
        runs = [(name, srcs)]
        if c == 0:  # the broken variants use the first config's data
            runs.append((f"{name}_nobarrier", {"forward": remove_second_barrier(srcs["forward"])}))
            bad_mask = break_source(srcs["forward"], "j <= row", "j < row", "_badmask")
            runs.append((f"{name}_badmask", {"forward": bad_mask}))
            runs.append((f"{name}_dkv_nobarrier", {"dkv": break_source(
                srcs["dkv"], "      FA_BARRIER();\n\n      const int i", "\n      const int i", "_nobarrier")}))
        for tag, kernels in runs:
            for kind, src in kernels.items():
                units.append(src)
                for n, x in inputs.items():
                    (tmp / f"{tag}_{kind}_{n}.bin").write_bytes(to_bytes(x))
                heads = Hkv if kind == "dkv" else H
                grid, tg = launch_grid(L, heads, B, ROWS)
                calls.append(call_code(f"{tag}_{kind}", src, shapes, grid, tg, str(tmp)))
    cpp = tmp / "kernels.cpp"
    cpp.write_text('#include "metal_shim.h"\n' + "\n".join(units) + "\nint main() {\n" + "\n".join(calls) + "\n}\n")
    exe = tmp / "kernels"
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-Wno-attributes", f"-I{HERE}", str(cpp), "-o", str(exe)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-5000:]
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return tmp, expected


def result(tmp: Path, tag: str, name: str, dtype: mx.Dtype, shape) -> mx.array:
    return from_file(tmp / f"{tag}_{name}.bin", dtype if name not in ("lse",) else mx.float32, shape)


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_kernels_match_reference(shim_run, config):
    tmp, expected = shim_run
    name, B, H, Hkv, L, D, causal, dtype = config
    dt = getattr(mx, dtype)
    tol = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    exp = expected[name]
    got = {
        "out": result(tmp, f"{name}_forward", "out", dt, (B, H, L, D)),
        "lse": result(tmp, f"{name}_forward", "lse", dt, (B, H, L)),
        "dq": result(tmp, f"{name}_dq", "dq", dt, (B, H, L, D)),
        "dk": result(tmp, f"{name}_dkv", "dk", dt, (B, Hkv, L, D)),
        "dv": result(tmp, f"{name}_dkv", "dv", dt, (B, Hkv, L, D)),
    }
    for key, value in got.items():
        err = mx.abs(value - exp[key]).max().item()
        assert err <= tol, f"{key}: max error {err:.3g} > {tol}"


@pytest.mark.parametrize("variant", ["nobarrier", "badmask"])
def test_broken_forward_is_caught(shim_run, variant):
    tmp, expected = shim_run
    name, B, H, Hkv, L, D, causal, dtype = CONFIGS[0]
    got = result(tmp, f"{name}_{variant}_forward", "out", mx.float32, (B, H, L, D))
    err = mx.abs(got - expected[name]["out"]).max().item()
    assert not err <= 1e-3, "the shim run did not notice a broken kernel"


def test_broken_dkv_is_caught(shim_run):
    tmp, expected = shim_run
    name, B, H, Hkv, L, D, causal, dtype = CONFIGS[0]
    got = result(tmp, f"{name}_dkv_nobarrier_dkv", "dk", mx.float32, (B, Hkv, L, D))
    err = mx.abs(got - expected[name]["dk"]).max().item()
    assert not err <= 1e-3, "the shim run did not notice a broken kernel"
