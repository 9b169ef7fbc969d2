// One MLX primitive, C = A @ B in float32 from bfloat16 products: MKL's cblas_gemm_bf16bf16f32, which runs
// on the AMX tiles of an Intel Xeon that has them and on AVX512_BF16 elsewhere. mlxllm builds this file
// when a run first asks for bfloat16 on the CPU (mlxllm/cpu/bf16build.py) and routes the model's matrix
// products through it (mlxllm/cpu/bf16matmul.py); nothing else uses it.
//
// A and B are 2-D, float32 or bfloat16, in any layout: a row-major or column-major operand in bfloat16 is
// read where it lies (a transposed view costs nothing), anything else is rounded (to nearest even) into a
// dense bfloat16 copy first. The output is always float32, so gradients stay float32 (as autocast's).
// MKL is not linked: Python finds the function in the MKL it loads and hands its address to set_gemm.

#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

// CBLAS's enum values, and MKL's cblas_gemm_bf16bf16f32 with its LP64 interface (MKL_INT = int).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using GemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                        float*, int);
GemmFn gemm_fn = nullptr;

// A 2-D operand as captured for the task: its data (offset included) and its strides in elements.
struct View {
  const void* data;
  int64_t rows, cols, s0, s1;
  bool bf16;
};

// An operand as MKL reads it: row-major storage of the matrix or (trans) of its transpose.
struct Operand {
  const uint16_t* data;
  bool trans;
  int ld;
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

bool fits(int64_t n) {
  return n >= 1 && n <= INT32_MAX;
}

// The operand MKL reads for v, in place when it is bfloat16 in a BLAS layout, else from `scratch`.
Operand prepare(const View& v, std::vector<uint16_t>& scratch) {
  // A stride along an axis of length 1 is never followed, whatever it is.
  int64_t s0 = v.rows == 1 ? v.cols : v.s0, s1 = v.cols == 1 ? 1 : v.s1;
  bool row = s1 == 1 && s0 >= v.cols && fits(s0);
  int64_t t0 = v.rows == 1 ? 1 : v.s0, t1 = v.cols == 1 ? v.rows : v.s1;
  bool col = !row && t0 == 1 && t1 >= v.rows && fits(t1);
  if (v.bf16 && (row || col)) return {static_cast<const uint16_t*>(v.data), col, int(row ? s0 : t1)};
  scratch.resize(size_t(v.rows * v.cols));
  if (!v.bf16 && col) {  // read it in its own order, into a dense copy of its transpose
    convert(static_cast<const float*>(v.data), v.cols, v.rows, t1, 1, scratch.data());
    return {scratch.data(), true, int(v.rows)};
  }
  if (v.bf16)
    copy_bf16(static_cast<const uint16_t*>(v.data), v.rows, v.cols, v.s0, v.s1, scratch.data());
  else
    convert(static_cast<const float*>(v.data), v.rows, v.cols, row ? s0 : v.s0, row ? 1 : v.s1, scratch.data());
  return {scratch.data(), false, int(v.cols)};
}

void run(View a, View b, float* c) {
  int64_t m = a.rows, k = a.cols, n = b.cols;
  if (m == 0 || n == 0) return;
  if (k == 0) {
    std::memset(c, 0, size_t(m * n) * sizeof(float));
    return;
  }
  // Per stream thread, reused: a training step calls this hundreds of times.
  thread_local std::vector<uint16_t> scratch_a, scratch_b;
  Operand pa = prepare(a, scratch_a), pb = prepare(b, scratch_b);
  gemm_fn(kRowMajor, pa.trans ? kTrans : kNoTrans, pb.trans ? kTrans : kNoTrans, int(m), int(n), int(k), 1.0f,
          pa.data, pa.ld, pb.data, pb.ld, 0.0f, c, int(n));
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
    // MLX keeps the inputs' buffers alive until the task has run.
    encoder.dispatch([a = view_of(inputs[0]), b = view_of(inputs[1]), c = out.data<float>()]() { run(a, b, c); });
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
      auto t = argnums[i] == 0 ? bf16_matmul(tangents[i], primals[1], stream()) : bf16_matmul(primals[0], tangents[i], stream());
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
  if (gemm_fn == nullptr) throw std::runtime_error("set_gemm has not been given MKL's cblas_gemm_bf16bf16f32.");
  if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(0))
    throw std::invalid_argument("matmul takes an (M, K) and a (K, N) array.");
  if (!gemm_dtype(a.dtype()) || !gemm_dtype(b.dtype()))
    throw std::invalid_argument("matmul takes float32 or bfloat16 arrays.");
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("matmul runs on the CPU only.");
  return mx::array(mx::Shape{a.shape(0), b.shape(1)}, mx::float32, std::make_shared<Bf16Matmul>(stream), {a, b});
}

}  // namespace

NB_MODULE(_bf16gemm, m) {
  m.doc() = "A @ B in float32 from MKL's bfloat16 GEMM, for MLX's CPU backend (mlxllm).";
  m.def("set_gemm", [](uintptr_t address) { gemm_fn = reinterpret_cast<GemmFn>(address); }, "address"_a,
        "The address of MKL's cblas_gemm_bf16bf16f32, which every product calls.");
  m.def("matmul", &bf16_matmul, "a"_a, "b"_a, nb::kw_only(), "stream"_a = nb::none(),
        "a (M, K) @ b (K, N), float32 or bfloat16 in any layout, as float32 from bfloat16 products.");
}
