// A stand-in for the Metal Shading Language, so a Metal compute kernel compiles as C++ and runs on the CPU.
//
// Each GPU thread of a threadgroup is a fiber (ucontext) on one OS thread. Fibers run in index order
// between synchronisation points; threadgroup_barrier parks a fiber until every live fiber of the group
// has arrived, and the SIMD-group functions park it until its 32 lanes have arrived. Because of this fixed
// schedule a missing barrier shows up deterministically (thread 0 reads shared memory before the others
// have written it), and a barrier reached by only part of a group is reported as a deadlock.
//
// Address spaces become nothing, except `threadgroup`, which becomes `static`: all fibers of a group run
// in one OS thread, one group at a time, so a function-local static is exactly one group's shared memory.
// This holds for kernels that use `threadgroup` only to declare shared arrays (ours do).
#pragma once

// macOS's <ucontext.h> refuses to declare its (deprecated) functions unless _XOPEN_SOURCE is set.
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700
#endif
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <fstream>
#include <string>
#include <vector>

namespace mshim {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

// fp16 and bf16 as storage types with float conversions (enough for kernels that compute in fp32).
struct half {
  _Float16 v;
  half() = default;
  half(float f) : v(static_cast<_Float16>(f)) {}
  operator float() const { return static_cast<float>(v); }
};

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
    bits = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

constexpr int kSimdWidth = 32;
constexpr size_t kStack = 256 * 1024;

enum State { kRunnable, kAtBarrier, kAtSimd, kDone };

// Runs one threadgroup: n fibers executing body(i), scheduled cooperatively.
struct Group {
  int n = 0;
  int cur = 0;
  ucontext_t main_ctx;
  std::vector<ucontext_t> ctx;
  std::vector<State> state;
  std::vector<std::vector<char>> stacks;
  std::vector<float> slot;  // one value per lane for SIMD-group exchanges
  std::function<void(int)> body;
  long barriers = 0;

  void park(State s) {
    state[cur] = s;
    swapcontext(&ctx[cur], &main_ctx);
  }
};

inline Group*& group() {
  static Group* g = nullptr;
  return g;
}

inline void trampoline() {
  Group* g = group();
  g->body(g->cur);
  g->state[g->cur] = kDone;  // uc_link returns to the scheduler
}

inline void run_group(int n, const std::function<void(int)>& body) {
  Group g;
  g.n = n;
  g.body = body;
  g.ctx.resize(n);
  g.state.assign(n, kRunnable);
  g.stacks.resize(n);
  g.slot.assign(n + kSimdWidth, 0.0f);
  group() = &g;
  for (int i = 0; i < n; ++i) {
    g.stacks[i].resize(kStack);
    getcontext(&g.ctx[i]);
    g.ctx[i].uc_stack.ss_sp = g.stacks[i].data();
    g.ctx[i].uc_stack.ss_size = kStack;
    g.ctx[i].uc_link = &g.main_ctx;
    makecontext(&g.ctx[i], trampoline, 0);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      if (g.state[i] == kRunnable) {
        g.cur = i;
        swapcontext(&g.main_ctx, &g.ctx[i]);
        ran = true;
      }
    }
    int live = 0, at_barrier = 0;
    for (int i = 0; i < n; ++i) {
      live += g.state[i] != kDone;
      at_barrier += g.state[i] == kAtBarrier;
    }
    if (live == 0) break;
    bool released = false;
    if (at_barrier == live) {  // every live thread reached threadgroup_barrier
      for (int i = 0; i < n; ++i)
        if (g.state[i] == kAtBarrier) g.state[i] = kRunnable;
      released = true;
      ++g.barriers;
    }
    for (int s = 0; s < n; s += kSimdWidth) {  // SIMD groups whose live lanes all wait in a SIMD function
      int lanes = 0, waiting = 0;
      for (int i = s; i < std::min(n, s + kSimdWidth); ++i) {
        lanes += g.state[i] != kDone;
        waiting += g.state[i] == kAtSimd;
      }
      if (lanes > 0 && waiting == lanes) {
        for (int i = s; i < std::min(n, s + kSimdWidth); ++i)
          if (g.state[i] == kAtSimd) g.state[i] = kRunnable;
        released = true;
      }
    }
    if (!ran && !released) {
      std::fprintf(stderr, "metal_shim: deadlock - threads wait at different barriers\n");
      std::exit(3);
    }
  }
  group() = nullptr;
}

// Runs every threadgroup of the grid, one after another. grid is in threads, as in mx.fast.metal_kernel.
struct Launch {
  uint3 threadgroup_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 threads_per_threadgroup;
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned threads_per_simdgroup = kSimdWidth;
};

inline void dispatch(uint3 grid, uint3 tg, const std::function<void(const Launch&)>& kernel) {
  const unsigned n = tg.x * tg.y * tg.z;
  for (unsigned gz = 0; gz < (grid.z + tg.z - 1) / tg.z; ++gz)
    for (unsigned gy = 0; gy < (grid.y + tg.y - 1) / tg.y; ++gy)
      for (unsigned gx = 0; gx < (grid.x + tg.x - 1) / tg.x; ++gx)
        run_group(n, [&](int i) {
          Launch t;
          t.threadgroup_position_in_grid = {gx, gy, gz};
          t.thread_position_in_threadgroup = {i % tg.x, (i / tg.x) % tg.y, i / (tg.x * tg.y)};
          t.thread_position_in_grid = {gx * tg.x + t.thread_position_in_threadgroup.x,
                                       gy * tg.y + t.thread_position_in_threadgroup.y,
                                       gz * tg.z + t.thread_position_in_threadgroup.z};
          t.threads_per_threadgroup = tg;
          t.thread_index_in_threadgroup = i;
          t.thread_index_in_simdgroup = i % kSimdWidth;
          t.simdgroup_index_in_threadgroup = i / kSimdWidth;
          kernel(t);
        });
}

template <typename T>
std::vector<T> load(const std::string& path, size_t count) {
  std::vector<T> out(count);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(out.data()), count * sizeof(T));
  if (!f) {
    std::fprintf(stderr, "metal_shim: cannot read %s\n", path.c_str());
    std::exit(2);
  }
  return out;
}

template <typename T>
void save(const std::string& path, const std::vector<T>& data) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(data.data()), data.size() * sizeof(T));
}

}  // namespace mshim

// ---- The Metal names a kernel body uses. ----

using mshim::bfloat16_t;
using mshim::half;
using float16_t = mshim::half;
using mshim::uint3;
using uint = unsigned int;
using ushort = unsigned short;

enum class mem_flags { mem_none, mem_device, mem_threadgroup };

inline void threadgroup_barrier(mem_flags) { mshim::group()->park(mshim::kAtBarrier); }

namespace mshim {
// Every lane publishes its value, waits for its SIMD group, reads, and waits again so the slots can be reused.
template <typename F>
inline float simd_exchange(float x, F&& combine) {
  Group* g = group();
  const int me = g->cur;
  g->slot[me] = x;
  g->park(kAtSimd);
  const float r = combine(&g->slot[me - me % kSimdWidth]);
  g->park(kAtSimd);
  return r;
}
}  // namespace mshim

inline float simd_sum(float x) {
  return mshim::simd_exchange(x, [](const float* s) {
    float r = 0.0f;
    for (int i = 0; i < mshim::kSimdWidth; ++i) r += s[i];
    return r;
  });
}

inline float simd_max(float x) {
  return mshim::simd_exchange(x, [](const float* s) {
    float r = s[0];
    for (int i = 1; i < mshim::kSimdWidth; ++i) r = std::max(r, s[i]);
    return r;
  });
}

inline float simd_shuffle(float x, ushort lane) {
  return mshim::simd_exchange(x, [lane](const float* s) { return s[lane]; });
}

namespace metal {
using std::exp;
using std::log;
using std::max;
using std::min;
namespace fast {
using std::exp;
using std::log;
}  // namespace fast
}  // namespace metal

// Address spaces: last, so that the standard headers above are not affected.
#define device
#define constant
#define thread
#define threadgroup static
