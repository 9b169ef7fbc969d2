// One MLX primitive, C = A @ B in float32 from bfloat16 products: oneDNN's matmul primitive (bfloat16 source
// and weights, float32 destination), which runs on the AMX tiles of an Intel Xeon that has them and with
// AVX512_BF16 elsewhere (AMD Zen 4 and later among them). mlxllm builds this file when a run first asks for
// bfloat16 on the CPU (mlxllm/cpu/bf16build.py, against the `onednn-cpu-gomp` wheel's libdnnl, on GNU OpenMP)
// and routes the model's matrix products through it (mlxllm/cpu/bf16matmul.py); nothing else uses it.
//
// A and B are 2-D, float32 or bfloat16, in any layout: a row-major or column-major operand in bfloat16 is
// read where it lies (a transposed view costs nothing), anything else is rounded (to nearest even) into a
// dense bfloat16 copy first. The output is always float32, so gradients stay float32 (as autocast's).
// oneDNN's primitives are made once per shape and layout and kept: a training step calls this hundreds of
// times with a handful of shapes.

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <oneapi/dnnl/dnnl.hpp>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

// The OpenMP runtime libdnnl (the GNU OpenMP build) runs on, found where libdnnl loaded it: weak, so that a
// libdnnl on another threading runtime still loads (and set_threads then says it cannot).
extern "C" {
__attribute__((weak)) void omp_set_num_threads(int);
__attribute__((weak)) int omp_get_max_threads();
}

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// A 2-D operand as captured for the task: its data (offset included) and its strides in elements.
struct View {
  const void* data;
  int64_t rows, cols, s0, s1;
  bool bf16;
};

// How an operand reaches oneDNN's matmul: read in place (bfloat16 in a BLAS layout); rounded into a dense
// bfloat16 buffer of the same orientation by a oneDNN reorder (float32 in a BLAS layout, leading dimension
// src_ld: vectorized and on oneDNN's threads); or else copied element by element into a dense row-major one.
// `trans`: what the matmul reads holds the matrix column-major; ld: its leading dimension. (oneDNN's bfloat16
// fpmath mode on float32 inputs is no substitute: it allows bfloat16, and on an AVX512_BF16 CPU it picks
// float32 kernels, so the products would not be the bfloat16 ones a run asked for.)
struct Layout {
  bool in_place, round, trans;
  int64_t ld, src_ld;
};

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // A NaN would round into infinity: keep it a (quiet) NaN.
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
}

// rows x cols values, row i at src + i * ld, element j of it at j * step, into a dense row-major buffer.
__attribute__((target_clones("avx512f", "avx2", "default"))) void convert(const float* src, int64_t rows,
                                                                           int64_t cols, int64_t ld, int64_t step,
                                                                           uint16_t* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * ld;
    uint16_t* d = dst + i * cols;
    if (step == 1) {
      for (int64_t j = 0; j < cols; ++j) d[j] = to_bf16(s[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) d[j] = to_bf16(s[j * step]);
    }
  }
}

void copy_bf16(const uint16_t* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, uint16_t* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = src[i * s0 + j * s1];
}

// Row-major (s1 == 1) or column-major (s0 == 1) with a leading dimension that covers the other axis; a stride
// along an axis of length 1 is never followed, whatever it is.
bool row_major(const View& v, int64_t& ld) {
  int64_t s0 = v.rows == 1 ? v.cols : v.s0, s1 = v.cols == 1 ? 1 : v.s1;
  ld = s0;
  return s1 == 1 && s0 >= v.cols;
}

bool col_major(const View& v, int64_t& ld) {
  int64_t t0 = v.rows == 1 ? 1 : v.s0, t1 = v.cols == 1 ? v.rows : v.s1;
  ld = t1;
  return t0 == 1 && t1 >= v.rows;
}

Layout plan(const View& v) {
  int64_t ld;
  if (row_major(v, ld)) return {v.bf16, !v.bf16, false, v.bf16 ? ld : v.cols, ld};
  if (col_major(v, ld)) return {v.bf16, !v.bf16, true, v.bf16 ? ld : v.rows, ld};
  return {false, false, false, v.cols, 0};  // any other strides: a dense row-major copy
}

// The element-by-element copy of an operand in no BLAS layout into `dst`, dense row-major bfloat16.
void copy(const View& v, uint16_t* dst) {
  if (v.bf16)
    copy_bf16(static_cast<const uint16_t*>(v.data), v.rows, v.cols, v.s0, v.s1, dst);
  else
    convert(static_cast<const float*>(v.data), v.rows, v.cols, v.s0, v.s1, dst);
}

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

dnnl::memory::desc desc(int64_t rows, int64_t cols, const Layout& l, dnnl::memory::data_type t) {
  dnnl::memory::dims strides = l.trans ? dnnl::memory::dims{1, l.ld} : dnnl::memory::dims{l.ld, 1};
  return dnnl::memory::desc({rows, cols}, t, strides);
}

// A float32 operand's rounding into bfloat16: the reorder and its descriptors.
struct Round {
  dnnl::reorder prim;
  dnnl::memory::desc src, dst;
};

// A matmul primitive for one shape and pair of layouts, with its descriptors and scratchpad size, and the
// reorders that round its float32 operands.
struct Gemm {
  dnnl::matmul prim;
  dnnl::memory::desc a, b, c, scratch;
  std::optional<Round> round_a, round_b;
};

std::optional<Round> round_for(int64_t rows, int64_t cols, const Layout& l, const dnnl::memory::desc& dst) {
  if (!l.round) return std::nullopt;
  auto src = desc(rows, cols, {false, false, l.trans, l.src_ld, 0}, dnnl::memory::data_type::f32);
  return Round{dnnl::reorder(dnnl::reorder::primitive_desc(engine(), src, engine(), dst)), src, dst};
}

using Side = std::tuple<bool, bool, bool, int64_t, int64_t>;  // a Layout, whole: how the operand is prepared too
using Key = std::tuple<int64_t, int64_t, int64_t, Side, Side>;

Side side(const Layout& l) {
  return {l.in_place, l.round, l.trans, l.ld, l.src_ld};
}

// Made once per key and kept (oneDNN's primitives may run from several threads at once; the scratchpad is
// the caller's, so they share nothing while they run).
const Gemm& gemm_for(int64_t m, int64_t k, int64_t n, const Layout& la, const Layout& lb) {
  static std::mutex lock;
  static std::map<Key, Gemm> made;
  Key key{m, k, n, side(la), side(lb)};
  std::lock_guard<std::mutex> hold(lock);
  auto found = made.find(key);
  if (found != made.end()) return found->second;
  using dt = dnnl::memory::data_type;
  auto a = desc(m, k, la, dt::bf16), b = desc(k, n, lb, dt::bf16), c = desc(m, n, {false, false, false, n, 0}, dt::f32);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(engine(), a, b, c, attr);
  Gemm gemm{dnnl::matmul(pd), a, b, c, pd.scratchpad_desc(), round_for(m, k, la, a), round_for(k, n, lb, b)};
  return made.emplace(key, std::move(gemm)).first->second;
}

// The data the matmul reads for v: v's own, or `scratch` made from it (by `round` or by `copy`).
void* operand(const View& v, const Layout& l, const std::optional<Round>& round, std::vector<uint16_t>& scratch,
              dnnl::stream& stream) {
  if (l.in_place) return const_cast<void*>(v.data);
  scratch.resize(size_t(v.rows * v.cols));
  if (round) {
    dnnl::memory src(round->src, engine(), const_cast<void*>(v.data));
    dnnl::memory dst(round->dst, engine(), scratch.data());
    round->prim.execute(stream, src, dst);
  } else {
    copy(v, scratch.data());
  }
  return scratch.data();
}

// The OpenMP threads each product may use, 0 for OpenMP's own count (OMP_NUM_THREADS, else every core).
// OpenMP's count belongs to the calling thread: each MLX stream thread that calls oneDNN leads a team of its
// own, so with several streams each must be told its share, or their teams oversubscribe the cores.
std::atomic<int> wanted_threads{0};
std::atomic<int> last_threads{0};  // the count the latest product ran with

void follow_threads() {
  if (!omp_set_num_threads || !omp_get_max_threads) return;
  thread_local int own = omp_get_max_threads(), told = own;
  int want = wanted_threads.load(std::memory_order_relaxed);
  if (want <= 0) want = own;
  if (want != told) {
    omp_set_num_threads(want);
    told = want;
  }
  last_threads.store(omp_get_max_threads(), std::memory_order_relaxed);
}

void run(const Gemm& g, View a, Layout la, View b, Layout lb, float* c) {
  // Per stream thread, reused: a training step calls this hundreds of times.
  thread_local std::vector<uint16_t> scratch_a, scratch_b;
  thread_local std::vector<char> pad;
  thread_local std::optional<dnnl::stream> stream;
  follow_threads();
  if (!stream) stream.emplace(engine());
  void* pa = operand(a, la, g.round_a, scratch_a, *stream);
  void* pb = operand(b, lb, g.round_b, scratch_b, *stream);
  pad.resize(g.scratch.get_size() + 1);
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, dnnl::memory(g.a, engine(), pa)},
      {DNNL_ARG_WEIGHTS, dnnl::memory(g.b, engine(), pb)},
      {DNNL_ARG_DST, dnnl::memory(g.c, engine(), c)},
      {DNNL_ARG_SCRATCHPAD, dnnl::memory(g.scratch, engine(), pad.data())},
  };
  g.prim.execute(*stream, args);
  stream->wait();
}

View view_of(const mx::array& x) {
  return {x.data<void>(), x.shape(0), x.shape(1), x.strides()[0], x.strides()[1], x.dtype() == mx::bfloat16};
}

mx::array bf16_matmul(const mx::array& a, const mx::array& b, mx::StreamOrDevice s = {});

class Bf16Matmul : public mx::UnaryPrimitive {
 public:
  explicit Bf16Matmul(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(inputs[0]);
    encoder.set_input_array(inputs[1]);
    encoder.set_output_array(out);
    View a = view_of(inputs[0]), b = view_of(inputs[1]);
    float* c = out.data<float>();
    if (a.rows == 0 || b.cols == 0) return;
    if (a.cols == 0) {
      encoder.dispatch([c, n = out.size()]() { std::memset(c, 0, n * sizeof(float)); });
      return;
    }
    Layout la = plan(a), lb = plan(b);
    // Made here, not in the task, so that an error of oneDNN's raises where the graph is evaluated.
    const Gemm* g = &gemm_for(a.rows, a.cols, b.cols, la, lb);
    // MLX keeps the inputs' buffers alive until the task has run.
    encoder.dispatch([g, a, la, b, lb, c]() { run(*g, a, la, b, lb, c); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxllm's bfloat16 GEMM runs on the CPU only.");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const auto& g = cotangents[0];
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      auto d = arg == 0 ? bf16_matmul(g, mx::transpose(primals[1], stream()), stream())
                        : bf16_matmul(mx::transpose(primals[0], stream()), g, stream());
      const auto& p = primals[arg];
      grads.push_back(p.dtype() == mx::float32 ? d : mx::astype(d, p.dtype(), stream()));
    }
    return grads;
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    std::optional<mx::array> sum;
    for (size_t i = 0; i < argnums.size(); ++i) {
      auto t = argnums[i] == 0 ? bf16_matmul(tangents[i], primals[1], stream())
                               : bf16_matmul(primals[0], tangents[i], stream());
      sum = sum ? mx::add(*sum, t, stream()) : t;
    }
    return {*sum};
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {mx::Shape{inputs[0].shape(0), inputs[1].shape(1)}};
  }

  const char* name() const override {
    return "Bf16Matmul";
  }

  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

bool gemm_dtype(mx::Dtype t) {
  return t == mx::float32 || t == mx::bfloat16;
}

mx::array bf16_matmul(const mx::array& a, const mx::array& b, mx::StreamOrDevice s) {
  if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(0))
    throw std::invalid_argument("matmul takes an (M, K) and a (K, N) array.");
  if (!gemm_dtype(a.dtype()) || !gemm_dtype(b.dtype()))
    throw std::invalid_argument("matmul takes float32 or bfloat16 arrays.");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("matmul runs on the CPU only.");
  return mx::array(mx::Shape{a.shape(0), b.shape(1)}, mx::float32, std::make_shared<Bf16Matmul>(stream), {a, b});
}

std::string version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

// n > 0: each product from now on uses n OpenMP threads (0: OpenMP's own count again); whether libdnnl's OpenMP runtime is there to be told.
bool set_threads(int n) {
  if (n < 0) throw std::invalid_argument("set_threads takes a count >= 0.");
  wanted_threads.store(n, std::memory_order_relaxed);
  return omp_set_num_threads != nullptr;
}

// The OpenMP threads the latest product ran with (on whichever stream thread), or 0 (none yet, no OpenMP).
int threads() {
  return last_threads.load(std::memory_order_relaxed);
}

}  // namespace

NB_MODULE(_bf16gemm, m) {
  m.doc() = "A @ B in float32 from oneDNN's bfloat16 matmul, for MLX's CPU backend (mlxllm).";
  m.def("matmul", &bf16_matmul, "a"_a, "b"_a, nb::kw_only(), "stream"_a = nb::none(),
        "a (M, K) @ b (K, N), float32 or bfloat16 in any layout, as float32 from bfloat16 products.");
  m.def("set_threads", &set_threads, "n"_a,
        "Let each product from now on use n OpenMP threads (0: OpenMP's own count); False without OpenMP.");
  m.def("threads", &threads, "The OpenMP threads the latest product ran with (0: none yet, or no OpenMP).");
  m.def("version", &version, "The version of the oneDNN library loaded.");
}
