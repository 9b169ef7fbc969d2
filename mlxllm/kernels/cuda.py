"""The CUDA translation unit `mx.fast.cuda_kernel` compiles for one of our kernels, rebuilt in Python.

MLX (mlx/backend/cuda/custom_kernel.cpp, `build_kernel`) JIT-compiles: its default header (which includes
`mlx/backend/cuda/device/utils.cuh` and <cooperative_groups.h>; MLX 0.32.0 dropped its `#define inf`, so
our kernels spell infinity themselves), our header, then
`namespace mlx::core::cu {` with a `__global__ void custom_kernel_<name><hash>(...)` whose parameters are the
inputs as `const T*`, the outputs as `T*`, and whose body opens with the template arguments as `constexpr`
/ `using` declarations. This module writes the same text so that it can be compiled offline (the tests
compile it to PTX with nvcc) without a CUDA build of MLX.
"""

from __future__ import annotations

from typing import Any

from mlxllm.kernels.fused import template_args
from mlxllm.kernels.source import INPUTS, OUTPUTS, kernel_source

import mlx.core as mx

MLX_DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

"""

CUDA_TYPES = {mx.float32: "float", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.int32: "int32_t"}
TYPE_TAGS = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t"}


def _hash(targs: list[tuple[str, Any]]) -> str:
    parts = []
    for _, arg in targs:
        if isinstance(arg, bool):
            parts.append("_t" if arg else "_f")
        elif isinstance(arg, int):
            parts.append(f"_{arg}")
        else:
            parts.append("_" + TYPE_TAGS[arg])
    return "".join(parts)


def translation_unit(
    kind: str,
    dtype: mx.Dtype,
    head_dim: int,
    causal: bool,
    groups: int,
    rows: int = 4,
    tile: int | None = None,
    default_header: str = MLX_DEFAULT_HEADER,
) -> str:
    """Full CUDA source of kernel `kind` ('forward', 'dq', 'dkv') as MLX's cuda_kernel would build it."""
    header, body = kernel_source(kind, "cuda")
    targs = template_args(dtype, head_dim, causal, groups, rows, tile)
    in_types = {"dims": mx.int32, "scale": mx.float32, "lse": mx.float32, "delta": mx.float32}
    out_types = {"lse": mx.float32}
    params = [f"    const {CUDA_TYPES[in_types.get(n, dtype)]}* {n}" for n in INPUTS[kind]]
    params += [f"    {CUDA_TYPES[out_types.get(n, dtype)]}* {n}" for n in OUTPUTS[kind]]
    consts = []
    for name, arg in targs:
        if isinstance(arg, bool):
            consts.append(f"  constexpr bool {name} = {'true' if arg else 'false'};")
        elif isinstance(arg, int):
            consts.append(f"  constexpr int {name} = {arg};")
        else:
            consts.append(f"  using {name} = {CUDA_TYPES[arg]};")
    name = f"custom_kernel_mlxllm_fa_{kind}{_hash(targs)}"
    return (
        default_header
        + header
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + "\n".join(consts)
        + "\n\n"
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )
