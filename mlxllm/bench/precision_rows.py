"""The bfloat16 rows of `mlxllm bench train --dtype bfloat16`, beside the float32 ones of the same run.

Each implementation in TWINNED gets a bfloat16 row right after its float32 one. mlxllm's trains with
train.dtype = "bfloat16", and computes in what mlxllm.cpu.precision.compute_dtype makes of that (on the
CPU, float32 unless MLXLLM_CPU_BF16=1), decided in the worker as training decides it; the row says what
it computed in. PyTorch's run the forward under torch.autocast(device_type="cpu", dtype=torch.bfloat16)
with float32 weights, gradients and AdamW state (mixed precision), eager and under torch.compile.
Every row's speed is also given against PyTorch eager in its own dtype.

MFU divides by the float32 matmul peak (measured in the run, or the CPU's theoretical float32 peak):
no bfloat16 peak of a CPU is known here (mlxllm.device has CPU figures for float32 only), so a row that
computes in bfloat16 is marked and the table says so rather than divide by an invented figure.
"""

from __future__ import annotations

from typing import Any

from mlxllm.errors import MlxllmError

DTYPES = ("float32", "bfloat16")
TWINNED = ("torch-eager", "torch-compile", "mlxllm")  # the implementations that get a bfloat16 row
MARK = "*"  # on the MFU of a row that computes in a dtype whose peak is not known


def worker_specs(impls: list[str], dtype: str) -> list[tuple[str, str]]:
    """(implementation, dtype) of each worker to run, in table order: every implementation in float32;
    with `dtype` bfloat16, each one in TWINNED in bfloat16 too, right after its float32 row."""
    if dtype not in DTYPES:
        raise MlxllmError(
            f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r}): float32 compares the float32 training "
            "steps; bfloat16 adds mlxllm's train.dtype = bfloat16 and PyTorch's bfloat16 autocast rows beside them."
        )
    specs = []
    for impl in impls:
        specs.append((impl, "float32"))
        if dtype != "float32" and impl in TWINNED:
            specs.append((impl, dtype))
    return specs


def untwinned_note(impls: list[str], dtype: str) -> str | None:
    """The note for the chosen implementations that have no `dtype` row, else None."""
    left = [i for i in impls if i not in TWINNED]
    if dtype == "float32" or not left:
        return None
    return f"float32 only (no {dtype} row): {', '.join(left)}; {dtype} rows are run for {', '.join(TWINNED)}"


def precision_fields(impl: str, dtype: str, ready: dict[str, Any]) -> dict[str, Any]:
    """A row's dtype columns from its worker's ready reply: the dtype asked for, the one its matmuls
    computed in, a label that says both, and compute_dtype's own line where the two differ."""
    computed = ready.get("compute_dtype", dtype)
    if dtype == "float32":
        label = "float32"
    elif impl.startswith("torch"):
        label = f"{dtype} autocast"
    elif computed != dtype:
        label = f"{dtype} (computed in {computed})"
    else:
        label = dtype
    return {
        "dtype": dtype,
        "compute_dtype": computed,
        "dtype_label": label,
        "dtype_note": ready.get("dtype_note"),
        "peak_dtype": "float32",  # what the MFU divides by (see the module's docstring)
    }


def add_eager_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's vs_torch_eager: its tokens/s over PyTorch eager's in the same config and dtype
    (None without such a row)."""
    base = {(r["config"], r["dtype"]): r["tokens_per_s"] for r in rows if r["impl"] == "torch-eager"}
    for r in rows:
        b = base.get((r["config"], r["dtype"]))
        r["vs_torch_eager"] = r["tokens_per_s"] / b if b else None


def mfu_text(r: dict[str, Any], key: str = "mfu") -> str:
    """The MFU cell: marked where the row computes in a dtype other than the peak's."""
    return f"{r[key]:.1%}" + (MARK if r["compute_dtype"] != r["peak_dtype"] else "")


def footnotes(rows: list[dict[str, Any]]) -> list[str]:
    """The lines under a config's table about precision: the mark on the MFU, the executed FLOPs per
    token where they differ by dtype, and why a row computed in another dtype than it asked for."""
    lines = []
    marked = [r for r in rows if r["compute_dtype"] != r["peak_dtype"]]
    if marked:
        lines.append(
            f"{MARK} computed in {marked[0]['compute_dtype']}: its MFU is against the {marked[0]['peak_dtype']} "
            f"peak above, as no {marked[0]['compute_dtype']} peak of this CPU is known (its bfloat16 units, "
            "AVX512-BF16 or AMX where present, can exceed float32's), so it is a share of the float32 peak"
        )
    flops = {r["dtype"]: r["exec_flops_per_token"] for r in rows}
    if len(set(flops.values())) > 1:
        lines.append(
            "executed matmul FLOPs/token by dtype (mlxllm's attention path in each): "
            + ", ".join(f"{d} {f / 1e6:.2f}M" for d, f in flops.items())
        )
    lines += list(dict.fromkeys(r["dtype_note"] for r in rows if r["dtype_note"]))
    return lines
