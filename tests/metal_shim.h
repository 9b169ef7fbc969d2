// A stand-in for the Metal Shading Language, so a Metal compute kernel compiles as C++ and runs on the CPU,
// with the checks a GPU does not make: it is meant to fail loudly where a real GPU would be silently wrong.
//
// Threads. Each GPU thread of a threadgroup is a fiber (ucontext) on one OS thread. Fibers run in index order
// between synchronisation points: threadgroup_barrier parks a fiber until every thread of the group has
// arrived, a SIMD-group function parks it until its 32 lanes have. Every barrier and SIMD-group call site is
// identified by its source line; the run fails (exit status 3, a message naming the kernel, threadgroup,
// threads and lines) when threads of one group wait at different barriers, when some threads have returned
// while others wait at a barrier, when lanes of a SIMD group call different SIMD-group functions, or when no
// thread can go on.
//
// Threadgroup memory. The test rewrites each `threadgroup T name[N];` declaration of a kernel into
// `MSHIM_THREADGROUP(T, name, N);`; any other use of `threadgroup` does not compile. Each threadgroup gets
// fresh arrays, filled with NaN (all bits set, a NaN in fp32, fp16 and bf16), so nothing carries over from
// the previous group and a read of memory nobody wrote shows up. Their total size is checked against Metal's
// 32 KiB limit. Every element access goes through a proxy that remembers, per element, the last writer and
// readers since the last barrier: a read of an element another thread wrote since that barrier, a write of
// one another thread read or wrote since then, or a read of an element nobody wrote, is a data race or an
// uninitialised read and fails the run (MSHIM_RACE_CHECK=0 in the environment turns this off, to see what
// the values alone show).
//
// Sanitizers. The header works under -fsanitize=address,undefined: fiber switches are announced to ASan
// (__sanitizer_start/finish_switch_fiber), and on Linux the contexts carry no uc_stack after makecontext
// (which has used it) because ASan's swapcontext interceptor would otherwise clear the shadow of the whole
// target stack at every switch (slow, and it would hide stack overflows in the kernel). ASan still prints
// its one-line warning that it does not fully support swapcontext; the annotations are what it asks for. Device buffers and threadgroup arrays are
// separate heap blocks, so an out-of-bounds access to either is an ASan report.
#pragma once

// macOS's <ucontext.h> refuses to declare its (deprecated) functions unless _XOPEN_SOURCE is set.
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700
#endif
#include <ucontext.h>

#if defined(__SANITIZE_ADDRESS__)
#define MSHIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MSHIM_ASAN 1
#endif
#endif
#ifdef MSHIM_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
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
constexpr size_t kStack = 128 * 1024;
constexpr size_t kThreadgroupMemoryLimit = 32768;  // MTLDevice.maxThreadgroupMemoryLength on Apple GPUs

enum State { kRunnable, kAtBarrier, kAtSimd, kDone };

// Where a thread waits: the call site of the barrier or SIMD-group function.
struct Site {
  const char* what = "";
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const {
    return line == o.line && std::strcmp(what, o.what) == 0 && std::strcmp(file, o.file) == 0;
  }
};

// What is running, for error messages.
struct Where {
  std::string kernel;
  uint3 group;
};
inline Where& where() {
  static Where w;
  return w;
}

[[noreturn]] inline void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "metal_shim: %s, threadgroup (%u, %u, %u): ", where().kernel.c_str(), where().group.x,
               where().group.y, where().group.z);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::exit(3);
}

inline bool race_checks() {
  static const bool on = [] {
    const char* e = std::getenv("MSHIM_RACE_CHECK");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

// Per element of a threadgroup array: who wrote it last and who read it, and in which barrier interval.
struct Cell {
  int w_epoch = -1, writer = -1;
  int r_epoch = -1, reader = -1;  // reader -2: several threads read it in r_epoch
};

struct Slot {
  std::string name;
  size_t bytes = 0;
  std::unique_ptr<unsigned char[]> data;
  std::vector<Cell> cells;
};

// "0-31, 64-95" for a sorted list of thread indices.
inline std::string ranges(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

inline std::string site_name(const Site& s) {
  return std::string(s.what) + " at " + s.file + ":" + std::to_string(s.line);
}

// Fiber stacks, kept across threadgroups (allocating 128 of them per group would dominate the run).
inline std::vector<std::unique_ptr<char[]>>& stack_pool() {
  static std::vector<std::unique_ptr<char[]>> pool;
  return pool;
}

// Runs one threadgroup: n fibers executing body(i), scheduled cooperatively.
struct Group {
  int n = 0;
  int cur = 0;   // the fiber now running (what the kernel's thread index reads)
  int from = 0;  // the context the last switch came from (-1: the scheduler)
  ucontext_t main_ctx;
  std::vector<ucontext_t> ctx;
  std::vector<char*> stacks;
  std::vector<State> state;
  std::vector<Site> site;
  std::vector<int> parity;        // which of the two exchange buffers a lane uses next
  std::vector<float> slot[2];     // one value per lane for SIMD-group exchanges, double-buffered
  std::vector<std::unique_ptr<Slot>> shared;
  std::vector<int> declared;      // threadgroup declarations each fiber has reached
  size_t shared_bytes = 0;
  int epoch = 0;                  // barriers released so far
  Site epoch_site;                // the barrier that opened the current interval
  const std::function<void(int)>* body = nullptr;
  void* fake_main = nullptr;
  std::vector<void*> fake;
  const void* main_bottom = nullptr;
  size_t main_size = 0;

  int next_runnable(int from_fiber) const {
    for (int i = from_fiber; i < n; ++i)
      if (state[i] == kRunnable) return i;
    return -1;
  }

  // Switches from context `src` to `dst` (-1: the scheduler) and returns when `src` is resumed.
  void transfer(int src, int dst) {
    if (dst >= 0) cur = dst;
    from = src;
#ifdef MSHIM_ASAN
    void** save = (src >= 0 && state[src] == kDone) ? nullptr : (src < 0 ? &fake_main : &fake[src]);
    __sanitizer_start_switch_fiber(save, dst < 0 ? main_bottom : stacks[dst], dst < 0 ? main_size : kStack);
#endif
    swapcontext(src < 0 ? &main_ctx : &ctx[src], dst < 0 ? &main_ctx : &ctx[dst]);
#ifdef MSHIM_ASAN
    __sanitizer_finish_switch_fiber(src < 0 ? fake_main : fake[src], nullptr, nullptr);
#endif
  }

  // The running fiber stops (waiting in s, or done); the next runnable fiber of this pass, or the scheduler,
  // goes on.
  void park(State s, const Site& where_) {
    const int me = cur;
    state[me] = s;
    site[me] = where_;
    const int next = next_runnable(me + 1);
    transfer(me, next);
  }

  Slot* declare(const char* name, size_t bytes, size_t count);
  void check_and_release_simd(bool& released);
  void check_and_release_barrier(bool& released);
  [[noreturn]] void stuck();
};

inline Group*& group() {
  static Group* g = nullptr;
  return g;
}

inline void trampoline() {
  Group* g = group();
#ifdef MSHIM_ASAN
  const void* bottom;
  size_t size;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (g->from < 0) {  // the first fiber of a group starts from the scheduler: learn its stack
    g->main_bottom = bottom;
    g->main_size = size;
  }
#endif
  const int me = g->cur;
  (*g->body)(me);
  g->park(kDone, Site{"return"});
  std::abort();  // a finished fiber is never resumed
}

inline Slot* Group::declare(const char* name, size_t bytes, size_t count) {
  const int k = declared[cur]++;
  if (k < (int)shared.size()) {
    Slot* s = shared[k].get();
    if (s->name != name || s->bytes != bytes)
      fail("thread %d declares threadgroup array %s where thread 0 declared %s", cur, name, s->name.c_str());
    return s;
  }
  auto s = std::make_unique<Slot>();
  s->name = name;
  s->bytes = bytes;
  s->data.reset(new unsigned char[bytes]);
  std::memset(s->data.get(), 0xff, bytes);  // NaN in every float format: uninitialised reads show
  s->cells.assign(count, Cell{});
  shared_bytes += bytes;
  shared.push_back(std::move(s));
  if (shared_bytes > kThreadgroupMemoryLimit) {
    std::string list;
    for (auto& a : shared) list += (list.empty() ? "" : ", ") + a->name + " " + std::to_string(a->bytes);
    fail("%zu bytes of threadgroup memory (%s), more than Metal's limit of %zu bytes", shared_bytes, list.c_str(),
         kThreadgroupMemoryLimit);
  }
  return shared.back().get();
}

// SIMD groups whose lanes all wait in a SIMD-group function go on, once they are checked to wait at the
// same call; lanes that returned while the others wait would leave the exchange undefined on a GPU.
inline void Group::check_and_release_simd(bool& released) {
  for (int s = 0; s < n; s += kSimdWidth) {
    const int e = std::min(n, s + kSimdWidth);
    std::vector<int> waiting, done, other;
    for (int i = s; i < e; ++i) (state[i] == kAtSimd ? waiting : state[i] == kDone ? done : other).push_back(i);
    if (waiting.empty()) continue;
    if (!done.empty())
      fail("threads %s returned while threads %s of their SIMD group wait in %s", ranges(done).c_str(),
           ranges(waiting).c_str(), site_name(site[waiting[0]]).c_str());
    if (!other.empty()) continue;  // part of the SIMD group is at a barrier: stuck() reports it if nothing moves
    for (int i : waiting)
      if (!(site[i] == site[waiting[0]]))
        fail("lanes of one SIMD group call different SIMD-group functions: thread %d %s, thread %d %s", waiting[0],
             site_name(site[waiting[0]]).c_str(), i, site_name(site[i]).c_str());
    for (int i : waiting) state[i] = kRunnable;
    released = true;
  }
}

// The barrier goes on once every thread of the group waits at it, and at the same one.
inline void Group::check_and_release_barrier(bool& released) {
  std::vector<int> at, done;
  int live = 0;
  for (int i = 0; i < n; ++i) {
    if (state[i] == kAtBarrier) at.push_back(i);
    if (state[i] == kDone) done.push_back(i);
    live += state[i] != kDone;
  }
  if (at.empty()) return;
  if (!done.empty())
    fail("threads %s returned while threads %s wait at %s: a barrier must be reached by every thread",
         ranges(done).c_str(), ranges(at).c_str(), site_name(site[at[0]]).c_str());
  if ((int)at.size() < live) return;
  std::vector<int> first, rest;
  for (int i : at) (site[i] == site[at[0]] ? first : rest).push_back(i);
  if (!rest.empty())
    fail("threads wait at different barriers: threads %s at %s, threads %s at %s", ranges(first).c_str(),
         site_name(site[first[0]]).c_str(), ranges(rest).c_str(), site_name(site[rest[0]]).c_str());
  for (int i : at) state[i] = kRunnable;
  ++epoch;
  epoch_site = site[at[0]];
  released = true;
}

[[noreturn]] inline void Group::stuck() {
  std::string msg;
  std::vector<bool> told(n, false);
  for (int i = 0; i < n; ++i) {
    if (told[i] || state[i] == kDone) continue;
    std::vector<int> same;
    for (int j = i; j < n; ++j)
      if (!told[j] && state[j] == state[i] && site[j] == site[i]) same.push_back(j), told[j] = true;
    msg += "; threads " + ranges(same) + " wait in " + site_name(site[i]);
  }
  fail("no thread can go on (deadlock)%s", msg.c_str());
}

// Returns the group's threadgroup memory in bytes.
inline size_t run_group(int n, const std::function<void(int)>& body) {
  Group g;
  g.n = n;
  g.body = &body;
  g.ctx.resize(n);
  g.state.assign(n, kRunnable);
  g.site.assign(n, Site{});
  g.parity.assign(n, 0);
  g.slot[0].assign(n + kSimdWidth, 0.0f);
  g.slot[1].assign(n + kSimdWidth, 0.0f);
  g.declared.assign(n, 0);
  g.fake.assign(n, nullptr);
  auto& pool = stack_pool();
  while ((int)pool.size() < n) pool.emplace_back(new char[kStack]);
  group() = &g;
  for (int i = 0; i < n; ++i) {
    g.stacks.push_back(pool[i].get());
#ifdef MSHIM_ASAN
    ASAN_UNPOISON_MEMORY_REGION(pool[i].get(), kStack);  // frames left by the fibers of the previous group
#endif
    getcontext(&g.ctx[i]);
    g.ctx[i].uc_stack.ss_sp = pool[i].get();
    g.ctx[i].uc_stack.ss_size = kStack;
    g.ctx[i].uc_link = nullptr;
    makecontext(&g.ctx[i], trampoline, 0);
#if defined(MSHIM_ASAN) && defined(__linux__)
    g.ctx[i].uc_stack.ss_sp = nullptr;  // see the header comment: keeps ASan's swapcontext interceptor away
    g.ctx[i].uc_stack.ss_size = 0;
#endif
  }
  for (;;) {
    const int first = g.next_runnable(0);
    if (first >= 0) g.transfer(-1, first);  // one pass: every runnable fiber runs to its next wait
    if (std::all_of(g.state.begin(), g.state.end(), [](State s) { return s == kDone; })) break;
    bool released = false;
    g.check_and_release_simd(released);
    g.check_and_release_barrier(released);
    if (!released) g.stuck();
  }
  group() = nullptr;
  return g.shared_bytes;
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

// Prints one line per kernel with its threadgroup memory, which the tests read.
inline void dispatch(const char* name, uint3 grid, uint3 tg, const std::function<void(const Launch&)>& kernel) {
  const unsigned n = tg.x * tg.y * tg.z;
  where().kernel = name;
  size_t bytes = 0;
  for (unsigned gz = 0; gz < (grid.z + tg.z - 1) / tg.z; ++gz)
    for (unsigned gy = 0; gy < (grid.y + tg.y - 1) / tg.y; ++gy)
      for (unsigned gx = 0; gx < (grid.x + tg.x - 1) / tg.x; ++gx) {
        where().group = {gx, gy, gz};
        bytes = run_group(n, [&](int i) {
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
  std::printf("metal_shim: %s threadgroup memory %zu bytes\n", name, bytes);
}

// A threadgroup array: element accesses are checked for bounds and, unless MSHIM_RACE_CHECK=0, for races.
template <typename T, long N>
class Shared {
 public:
  explicit Shared(const char* name) : slot_(group()->declare(name, sizeof(T) * N, N)) {}

  class Ref {
   public:
    Ref(Shared* a, long i) : a_(a), i_(i) {}
    operator T() const {
      a_->on_read(i_);
      return a_->data()[i_];
    }
    Ref& operator=(T x) {
      a_->on_write(i_);
      a_->data()[i_] = x;
      return *this;
    }
    Ref& operator=(const Ref& r) { return *this = static_cast<T>(r); }

   private:
    Shared* a_;
    long i_;
  };

  Ref operator[](long i) {
    if (i < 0 || i >= N) fail("thread %d indexes threadgroup array %s[%ld] out of bounds [0, %ld)", group()->cur,
                              slot_->name.c_str(), i, N);
    return Ref(this, i);
  }

 private:
  T* data() { return reinterpret_cast<T*>(slot_->data.get()); }

  std::string since() const {
    const Group* g = group();
    return g->epoch == 0 ? "since the threadgroup started" : "since " + site_name(g->epoch_site);
  }

  void on_read(long i) {
    if (!race_checks()) return;
    Group* g = group();
    Cell& c = slot_->cells[i];
    const int me = g->cur;
    if (c.w_epoch < 0) fail("thread %d reads %s[%ld], which no thread has written", me, slot_->name.c_str(), i);
    if (c.w_epoch == g->epoch && c.writer != me)
      fail("data race: thread %d reads %s[%ld], which thread %d wrote %s, with no barrier in between", me,
           slot_->name.c_str(), i, c.writer, since().c_str());
    if (c.r_epoch != g->epoch) {
      c.r_epoch = g->epoch;
      c.reader = me;
    } else if (c.reader != me) {
      c.reader = -2;
    }
  }

  void on_write(long i) {
    if (!race_checks()) return;
    Group* g = group();
    Cell& c = slot_->cells[i];
    const int me = g->cur;
    if (c.w_epoch == g->epoch && c.writer != me)
      fail("data race: thread %d writes %s[%ld], which thread %d wrote %s, with no barrier in between", me,
           slot_->name.c_str(), i, c.writer, since().c_str());
    if (c.r_epoch == g->epoch && c.reader != me) {
      const std::string who = c.reader == -2 ? "other threads" : "thread " + std::to_string(c.reader);
      fail("data race: thread %d writes %s[%ld], which %s read %s, with no barrier in between", me,
           slot_->name.c_str(), i, who.c_str(), since().c_str());
    }
    c.w_epoch = g->epoch;
    c.writer = me;
  }

  Slot* slot_;
};

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

// Every lane publishes its value, waits for its SIMD group and reads. The two buffers alternate, so a lane
// that runs ahead to the next exchange cannot overwrite a value a slower lane has yet to read.
template <typename F>
inline float simd_exchange(float x, F&& combine, const Site& where_) {
  Group* g = group();
  const int me = g->cur;
  const int p = g->parity[me];
  g->slot[p][me] = x;
  g->park(kAtSimd, where_);
  g->parity[me] = p ^ 1;
  return combine(&g->slot[p][me - me % kSimdWidth]);
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

// The extra parameters only carry the call site; kernels call these with Metal's arguments.
inline void threadgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  mshim::group()->park(mshim::kAtBarrier, mshim::Site{"threadgroup_barrier", file, line});
}

inline float simd_sum(float x, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return mshim::simd_exchange(
      x,
      [](const float* s) {
        float r = 0.0f;
        for (int i = 0; i < mshim::kSimdWidth; ++i) r += s[i];
        return r;
      },
      mshim::Site{"simd_sum", file, line});
}

inline float simd_max(float x, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return mshim::simd_exchange(
      x,
      [](const float* s) {
        float r = s[0];
        for (int i = 1; i < mshim::kSimdWidth; ++i) r = std::max(r, s[i]);
        return r;
      },
      mshim::Site{"simd_max", file, line});
}

inline float simd_shuffle(float x, ushort lane, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (lane >= mshim::kSimdWidth) mshim::fail("simd_shuffle from lane %u at %s:%d", lane, file, line);
  return mshim::simd_exchange(x, [lane](const float* s) { return s[lane]; },
                              mshim::Site{"simd_shuffle", file, line});
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

#define MSHIM_THREADGROUP(T, name, N) mshim::Shared<T, (N)> name(#name)

// Address spaces: last, so that the standard headers above are not affected. `threadgroup` is left
// undefined-as-a-type on purpose: only declarations rewritten to MSHIM_THREADGROUP are supported.
#define device
#define constant
#define thread
#define threadgroup mshim_threadgroup_only_in_array_declarations_rewritten_to_MSHIM_THREADGROUP
