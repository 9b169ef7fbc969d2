"""Kernel bodies for fused attention, shared by Metal and CUDA, and the small per-backend preludes.

Layout: one SIMD group (Metal) / warp (CUDA) of 32 threads owns one query row (forward, dQ) or one key
row (dK/dV). In the score step lane j handles key (or query) j of the tile; in the accumulate step lane l
owns head-dim elements l, l + 32, ... and takes the per-key weights from the other lanes by shuffles.
All arithmetic is fp32; T is only the storage type of q, k, v, dO and of the results.

Each body starts with a per-backend binding block that names the thread indices (`lane`, `warp`, `tid`,
`bx`, `by`, `bz`). It has to be in the body, not the header: `mx.fast.metal_kernel` only passes a Metal
builtin such as `thread_index_in_simdgroup` when that name appears in `source`.

Inputs `dims` (int32: B, H, Hkv, L) and `scale` (fp32, 1 element) carry the runtime sizes. Template
parameters: T (dtype), D (head dim), NW (rows per threadgroup = SIMD groups), BK (keys or queries per
inner tile, at most 32), CAUSAL, G (query heads per K/V head).
"""

from __future__ import annotations

# Metal: the JIT prepends MLX's utils (metal_stdlib, bfloat16_t), so only macros are needed.
# `threadgroup` appears only on declarations of shared arrays (the CPU shim in tests relies on that).
METAL_PRELUDE = """
#define FA_SHARED threadgroup
#define FA_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define FA_EXP(x) metal::exp(x)
#define FA_LOG(x) metal::log(x)
#define FA_FMAX(a, b) metal::max(a, b)
#define FA_IMIN(a, b) metal::min(a, b)
#define FA_INF INFINITY
#define FA_WARP_SUM(x) simd_sum(x)
#define FA_WARP_MAX(x) simd_max(x)
#define FA_SHUFFLE(x, j) simd_shuffle(x, (ushort)(j))
"""

METAL_BIND = """
  const int lane = (int)thread_index_in_simdgroup;
  const int warp = (int)simdgroup_index_in_threadgroup;
  const int tid = (int)thread_index_in_threadgroup;
  const int bx = (int)threadgroup_position_in_grid.x;
  const int by = (int)threadgroup_position_in_grid.y;
  const int bz = (int)threadgroup_position_in_grid.z;
"""

# CUDA: MLX's cuda_kernel puts template arguments in the body as constexpr/using declarations.
CUDA_PRELUDE = """
#ifndef MLXLLM_FA_CUDA_PRELUDE
#define MLXLLM_FA_CUDA_PRELUDE
#define FA_SHARED __shared__
#define FA_BARRIER() __syncthreads()
#define FA_EXP(x) expf(x)
#define FA_LOG(x) logf(x)
#define FA_FMAX(a, b) fmaxf(a, b)
#define FA_IMIN(a, b) min(a, b)
#define FA_INF __int_as_float(0x7f800000)
#define FA_WARP_SUM(x) fa_warp_sum(x)
#define FA_WARP_MAX(x) fa_warp_max(x)
#define FA_SHUFFLE(x, j) __shfl_sync(0xffffffffu, (x), (j))

__device__ __forceinline__ float fa_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float fa_warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
#endif
"""

CUDA_BIND = """
  const int lane = (int)(threadIdx.x % 32);
  const int warp = (int)(threadIdx.x / 32);
  const int tid = (int)threadIdx.x;
  const int bx = (int)blockIdx.x;
  const int by = (int)blockIdx.y;
  const int bz = (int)blockIdx.z;
"""

# Shared-memory rows are padded to D + 1 floats so that lanes reading different rows hit different banks.
FORWARD_BODY = """
  constexpr int DL = D / 32;
  constexpr int DP = D + 1;
  const int B = dims[0], H = dims[1], HKV = dims[2], L = dims[3];
  const float sc = scale[0];
  const int h = by, b = bz, hk = by / G;
  const int q0 = bx * NW;
  const int row = q0 + warp;
  const long qoff = (long)(b * H + h) * L * D;
  const long koff = (long)(b * HKV + hk) * L * D;
  FA_SHARED float qs[NW * D];
  FA_SHARED float ks[BK * DP];
  FA_SHARED float vs[BK * DP];
  (void)B;

  for (int e = tid; e < NW * D; e += NW * 32) {
    const int r = q0 + e / D;
    qs[e] = r < L ? static_cast<float>(q[qoff + (long)r * D + e % D]) * sc : 0.0f;
  }
  float m = -FA_INF;
  float lsum = 0.0f;
  float acc[DL];
  for (int c = 0; c < DL; ++c) acc[c] = 0.0f;

  // Causal: key tiles past the last query row of this threadgroup are never loaded.
  const int kend = CAUSAL ? FA_IMIN(L, q0 + NW) : L;
  for (int k0 = 0; k0 < kend; k0 += BK) {
    FA_BARRIER();  // the previous tile is consumed (and qs is written on the first pass)
    for (int e = tid; e < BK * D; e += NW * 32) {
      const int r = e / D, c = e % D;
      const bool ok = k0 + r < L;
      ks[r * DP + c] = ok ? static_cast<float>(k[koff + (long)(k0 + r) * D + c]) : 0.0f;
      vs[r * DP + c] = ok ? static_cast<float>(v[koff + (long)(k0 + r) * D + c]) : 0.0f;
    }
    FA_BARRIER();

    const int j = k0 + lane;
    const bool valid = lane < BK && j < L && row < L && (!CAUSAL || j <= row);
    float s = -FA_INF;
    if (valid) {
      float d = 0.0f;
      for (int c = 0; c < D; ++c) d += qs[warp * D + c] * ks[lane * DP + c];
      s = d;
    }
    // Online softmax: rescale what was accumulated so far to the new running max.
    const float mn = FA_FMAX(m, FA_WARP_MAX(s));
    const float p = valid ? FA_EXP(s - mn) : 0.0f;
    const float alpha = m == -FA_INF ? 0.0f : FA_EXP(m - mn);
    lsum = lsum * alpha + FA_WARP_SUM(p);
    for (int c = 0; c < DL; ++c) acc[c] *= alpha;
    for (int jj = 0; jj < BK; ++jj) {
      const float pj = FA_SHUFFLE(p, jj);
      for (int c = 0; c < DL; ++c) acc[c] += pj * vs[jj * DP + c * 32 + lane];
    }
    m = mn;
  }
  if (row < L) {
    const float inv = 1.0f / lsum;
    for (int c = 0; c < DL; ++c) out[qoff + (long)row * D + c * 32 + lane] = static_cast<T>(acc[c] * inv);
    if (lane == 0) lse[(long)(b * H + h) * L + row] = m + FA_LOG(lsum);
  }
"""

# dQ: the forward's loop again, with P = exp(S - lse) and dS = P * (dO.V^T - delta).
DQ_BODY = """
  constexpr int DL = D / 32;
  constexpr int DP = D + 1;
  const int B = dims[0], H = dims[1], HKV = dims[2], L = dims[3];
  const float sc = scale[0];
  const int h = by, b = bz, hk = by / G;
  const int q0 = bx * NW;
  const int row = q0 + warp;
  const long qoff = (long)(b * H + h) * L * D;
  const long koff = (long)(b * HKV + hk) * L * D;
  const long loff = (long)(b * H + h) * L;
  FA_SHARED float qs[NW * D];
  FA_SHARED float dos[NW * D];
  FA_SHARED float ks[BK * DP];
  FA_SHARED float vs[BK * DP];
  (void)B;

  for (int e = tid; e < NW * D; e += NW * 32) {
    const int r = q0 + e / D;
    const bool ok = r < L;
    qs[e] = ok ? static_cast<float>(q[qoff + (long)r * D + e % D]) * sc : 0.0f;
    dos[e] = ok ? static_cast<float>(dout[qoff + (long)r * D + e % D]) : 0.0f;
  }
  const float li = row < L ? lse[loff + row] : 0.0f;
  const float di = row < L ? delta[loff + row] : 0.0f;
  float acc[DL];
  for (int c = 0; c < DL; ++c) acc[c] = 0.0f;

  const int kend = CAUSAL ? FA_IMIN(L, q0 + NW) : L;
  for (int k0 = 0; k0 < kend; k0 += BK) {
    FA_BARRIER();
    for (int e = tid; e < BK * D; e += NW * 32) {
      const int r = e / D, c = e % D;
      const bool ok = k0 + r < L;
      ks[r * DP + c] = ok ? static_cast<float>(k[koff + (long)(k0 + r) * D + c]) : 0.0f;
      vs[r * DP + c] = ok ? static_cast<float>(v[koff + (long)(k0 + r) * D + c]) : 0.0f;
    }
    FA_BARRIER();

    const int j = k0 + lane;
    const bool valid = lane < BK && j < L && row < L && (!CAUSAL || j <= row);
    float ds = 0.0f;
    if (valid) {
      float s = 0.0f, dp = 0.0f;
      for (int c = 0; c < D; ++c) {
        s += qs[warp * D + c] * ks[lane * DP + c];
        dp += dos[warp * D + c] * vs[lane * DP + c];
      }
      ds = FA_EXP(s - li) * (dp - di);
    }
    for (int jj = 0; jj < BK; ++jj) {
      const float dsj = FA_SHUFFLE(ds, jj);
      for (int c = 0; c < DL; ++c) acc[c] += dsj * ks[jj * DP + c * 32 + lane];
    }
  }
  if (row < L) {
    for (int c = 0; c < DL; ++c) dq[qoff + (long)row * D + c * 32 + lane] = static_cast<T>(acc[c] * sc);
  }
"""

# dK/dV: one warp per key row, walking query tiles from the diagonal down, for each of the G query heads
# that share this K/V head. Every key row is owned by exactly one warp, so no atomics are needed.
DKV_BODY = """
  constexpr int DL = D / 32;
  constexpr int DP = D + 1;
  const int B = dims[0], H = dims[1], HKV = dims[2], L = dims[3];
  const int hk = by, b = bz;
  const int k0 = bx * NW;
  const int kr = k0 + warp;
  const long koff = (long)(b * HKV + hk) * L * D;
  FA_SHARED float kk[NW * D];
  FA_SHARED float vv[NW * D];
  FA_SHARED float qs[BK * DP];
  FA_SHARED float dos[BK * DP];
  FA_SHARED float ls[BK];
  FA_SHARED float dl[BK];
  (void)B;
  const float sc = scale[0];

  for (int e = tid; e < NW * D; e += NW * 32) {
    const int r = k0 + e / D;
    const bool ok = r < L;
    kk[e] = ok ? static_cast<float>(k[koff + (long)r * D + e % D]) : 0.0f;
    vv[e] = ok ? static_cast<float>(v[koff + (long)r * D + e % D]) : 0.0f;
  }
  float ak[DL], av[DL];
  for (int c = 0; c < DL; ++c) {
    ak[c] = 0.0f;
    av[c] = 0.0f;
  }

  // Causal: queries before this threadgroup's first key never attend to it.
  const int qstart = CAUSAL ? (k0 / BK) * BK : 0;
  for (int g = 0; g < G; ++g) {
    const int h = hk * G + g;
    const long qoff = (long)(b * H + h) * L * D;
    const long loff = (long)(b * H + h) * L;
    for (int q0 = qstart; q0 < L; q0 += BK) {
      FA_BARRIER();
      for (int e = tid; e < BK * D; e += NW * 32) {
        const int r = e / D, c = e % D;
        const bool ok = q0 + r < L;
        qs[r * DP + c] = ok ? static_cast<float>(q[qoff + (long)(q0 + r) * D + c]) * sc : 0.0f;
        dos[r * DP + c] = ok ? static_cast<float>(dout[qoff + (long)(q0 + r) * D + c]) : 0.0f;
      }
      for (int e = tid; e < BK; e += NW * 32) {
        const bool ok = q0 + e < L;
        ls[e] = ok ? lse[loff + q0 + e] : 0.0f;
        dl[e] = ok ? delta[loff + q0 + e] : 0.0f;
      }
      FA_BARRIER();

      const int i = q0 + lane;
      const bool valid = lane < BK && i < L && kr < L && (!CAUSAL || kr <= i);
      float p = 0.0f, ds = 0.0f;
      if (valid) {
        float s = 0.0f, dp = 0.0f;
        for (int c = 0; c < D; ++c) {
          s += qs[lane * DP + c] * kk[warp * D + c];
          dp += dos[lane * DP + c] * vv[warp * D + c];
        }
        p = FA_EXP(s - ls[lane]);
        ds = p * (dp - dl[lane]);
      }
      for (int ii = 0; ii < BK; ++ii) {
        const float pi = FA_SHUFFLE(p, ii);
        const float dsi = FA_SHUFFLE(ds, ii);
        for (int c = 0; c < DL; ++c) {
          av[c] += pi * dos[ii * DP + c * 32 + lane];
          ak[c] += dsi * qs[ii * DP + c * 32 + lane];  // qs already carries the scale
        }
      }
    }
  }
  if (kr < L) {
    for (int c = 0; c < DL; ++c) {
      dk[koff + (long)kr * D + c * 32 + lane] = static_cast<T>(ak[c]);
      dv[koff + (long)kr * D + c * 32 + lane] = static_cast<T>(av[c]);
    }
  }
"""

BODIES = {"forward": FORWARD_BODY, "dq": DQ_BODY, "dkv": DKV_BODY}
INPUTS = {
    "forward": ["q", "k", "v", "dims", "scale"],
    "dq": ["q", "k", "v", "dout", "lse", "delta", "dims", "scale"],
    "dkv": ["q", "k", "v", "dout", "lse", "delta", "dims", "scale"],
}
OUTPUTS = {"forward": ["out", "lse"], "dq": ["dq"], "dkv": ["dk", "dv"]}


def kernel_source(kind: str, backend: str) -> tuple[str, str]:
    """(header, body) of kernel `kind` ('forward', 'dq', 'dkv') for `backend` ('metal' or 'cuda')."""
    if backend == "metal":
        return METAL_PRELUDE, METAL_BIND + BODIES[kind]
    if backend == "cuda":
        return CUDA_PRELUDE, CUDA_BIND + BODIES[kind]
    raise ValueError(f"unknown kernel backend {backend!r}")
