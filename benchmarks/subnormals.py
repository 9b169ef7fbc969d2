"""Subnormal numbers in the training step's attention gradient: the fast exp with masked scores at exactly 0
(mlxllm's) against one that returned exp(-87) ~ 1.6e-38 for them (mlxllm before the change).

    python benchmarks/subnormals.py [CORPUS] [--config d256|d512] [--steps N]

First, what subnormals cost on this CPU: a 512 x 512 fp32 matmul (MLX, its BLAS) with normal inputs
against one whose left input is all subnormal, and an elementwise multiply whose results underflow.

One step of the benchmark config (`mlxllm bench train --config ...`) on real text (default: Tiny
Shakespeare; random bytes without it), after N training steps: each layer's attention inputs and the
gradient arriving at its output are recorded, and the score gradient dS = e * (dP - delta) * scale / l
that the causal-halves backward computes is rebuilt with both exps. Printed: how many of dS's values are
subnormal, and the share of the three backward matmuls' input (dS @ K, dS^T @ Q, e^T @ dO/l) they are.
Subnormals are what Intel cores handle by microcode assists (Intel's oneMKL guide, "Operating on
denormals"; VTune's "FP assists") unless FTZ/DAZ are set, which MLX does not do; AMD Zen handles them in
hardware, so this count, not a timing on this machine, is what carries over.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import mlxllm  # noqa: F401 - the BLAS before mlx.core
from mlxllm import attention as attention_mod
from mlxllm import step as step_mod
from mlxllm.bench.train import DEFAULT_CONFIGS as CONFIGS
from mlxllm.bench.workers import model_config
from mlxllm.config import TrainConfig
from mlxllm.cpu import fastexp
from mlxllm.model import build_model

import mlx.core as mx
import mlx.nn as nn
import numpy as np

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
TINY = float(np.finfo(np.float32).tiny)


def old_exp(x: mx.array) -> mx.array:
    """The fast exp as it was: clamped at -87, so a masked score gave exp(-87), not 0."""
    y = mx.maximum(x.astype(mx.float32), -87.0) / 128
    p = mx.array(1 / math.factorial(9))
    for i in range(8, -1, -1):
        p = p * y + 1 / math.factorial(i)
    for _ in range(7):
        p = p * p
    return p


def subnormal(a: mx.array) -> int:
    return int(((a != 0) & (mx.abs(a) < TINY)).sum().item())


def record_attention(records: list[dict]) -> None:
    """Wrap the model's causal-halves attention so that each call keeps q, k, v and its output's gradient."""
    real = attention_mod.causal_halves_attention

    def wrapped(q: mx.array, k: mx.array, v: mx.array, *, scale: float) -> mx.array:
        entry = {"q": q, "k": k, "v": v, "scale": scale}
        records.append(entry)

        @mx.custom_function
        def tap(x: mx.array) -> mx.array:
            return x

        @tap.vjp
        def _tap_vjp(x, cotangent, output):
            entry["do"] = cotangent
            return cotangent

        return tap(real(q, k, v, scale=scale))

    attention_mod.causal_halves_attention = wrapped


def score_gradients(r: dict, exp) -> list[tuple[mx.array, mx.array, mx.array]]:
    """(e, dP - delta, dS) of both query halves for one layer, as the backward in mlxllm.cpu.halves forms them."""
    q, k, v, do, scale = r["q"], r["k"], r["v"], r["do"], r["scale"]
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, L, D)
    k, v = k[:, :, None], v[:, :, None]
    do = do.reshape(B, Hkv, H // Hkv, L, D)
    h = L // 2
    out = []
    for qh, kh, vh, doh, offset in (
        (q[:, :, :, :h], k[:, :, :, :h], v[:, :, :, :h], do[:, :, :, :h], 0),
        (q[:, :, :, h:], k, v, do[:, :, :, h:], h),
    ):
        s = (qh @ kh.swapaxes(-1, -2)).astype(mx.float32)
        mask = mx.arange(offset, offset + qh.shape[-2])[:, None] >= mx.arange(kh.shape[-2])[None]
        s = mx.where(mask, s, -mx.inf)
        e = exp((s - s.max(axis=-1, keepdims=True)) * scale)
        l = e.sum(axis=-1, keepdims=True)
        dp = doh @ vh.swapaxes(-1, -2)
        g = dp - (dp * (e / l)).sum(axis=-1, keepdims=True)  # dP - delta, delta = rowsum(dP * P)
        out.append((e, g, e * g * (scale / l)))
    return out


def underflows(e: mx.array, g: mx.array) -> int:
    """Products e * g whose exact value is nonzero and below the smallest normal float: each comes out
    subnormal or flushed to zero by an underflow, both of which Intel cores assist."""
    x = np.abs(np.asarray(e, dtype=np.float64) * np.asarray(g, dtype=np.float64))
    return int(((x > 0) & (x < TINY)).sum())


def _best_ms(f, n: int = 9) -> float:
    f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def cost_here() -> None:
    """Subnormal against normal inputs on this CPU, for the same operations."""
    a, b = mx.random.normal((512, 512), key=mx.random.key(0)), mx.random.normal((512, 512), key=mx.random.key(1))
    normal, sub = a * 1e-3, a * 1e-40
    x = mx.random.uniform(0.5, 1.0, (4_000_000,), key=mx.random.key(2))
    mx.eval(normal, sub, b, x)
    assert subnormal(sub) == sub.size
    mm = [_best_ms(lambda m=m: mx.eval(m @ b)) for m in (normal, sub)]
    ew = [_best_ms(lambda f=f: mx.eval(x * f)) for f in (1e-3, 1e-40)]
    print(
        f"on this CPU: 512^2 matmul {mm[0]:.2f} ms with normal inputs, {mm[1]:.2f} ms with subnormal ones; "
        f"4M-element multiply {ew[0]:.2f} ms normal, {ew[1]:.2f} ms with subnormal results"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--config", default="d256", choices=[c["name"] for c in CONFIGS])
    parser.add_argument("--steps", type=int, default=20, help="training steps before the recorded one")
    args = parser.parse_args()
    cost_here()
    cfg = next(c for c in CONFIGS if c["name"] == args.config)
    mc = model_config({**cfg, "attention": "halves"})
    tc = TrainConfig(batch_size=cfg["batch_size"], seq_len=cfg["seq_len"], compile=False)
    B, L = cfg["batch_size"], cfg["seq_len"]
    text = (
        args.corpus.read_bytes()
        if args.corpus.is_file()
        else np.random.default_rng(0).integers(0, 256, 10**6).tobytes()
    )
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32) % cfg["vocab_size"]
    rng = np.random.default_rng(0)

    def batch() -> mx.array:
        starts = rng.integers(0, len(tokens) - L - 1, B)
        return mx.array(np.stack([tokens[s : s + L + 1] for s in starts]))

    model = build_model(mc, seed=0)
    optimizer = step_mod.make_optimizer(tc)
    grad = nn.value_and_grad(model, step_mod.loss_fn)
    for _ in range(args.steps):
        loss, g = grad(model, batch())
        optimizer.update(model, g)
        mx.eval(model.parameters(), optimizer.state)
    records: list[dict] = []
    record_attention(records)
    loss, g = grad(model, batch())
    mx.eval(loss, g, [list(r.values())[:3] + [r["do"]] for r in records])
    print(
        f"config {args.config} (batch {B}, context {L}), loss {loss.item():.3f} after {args.steps} steps; "
        f"{len(records)} attention layers; fast exp in use: {fastexp.use_fast_exp()}"
    )
    for name, exp in (
        ("exp(-87) for masked scores (before)", old_exp),
        ("0 for masked scores (mlxllm)", fastexp.exp_nonpositive),
    ):
        tiny_e = under = sub = total = 0
        for r in records:
            for e, g, ds in score_gradients(r, exp):
                mx.eval(e, g, ds)
                tiny_e += int(((e != 0) & (e < 1e-30)).sum().item())
                under += underflows(e, g)
                sub += subnormal(ds)
                total += ds.size
        print(
            f"  {name}:\n    score exps e in (0, 1e-30): {tiny_e:,} of {total:,} ({100 * tiny_e / total:.1f}%)\n"
            f"    products e * (dP - delta) that underflow: {under:,}; subnormal values in dS: {sub:,}"
        )


if __name__ == "__main__":
    main()
