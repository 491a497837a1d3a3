// CPU implementation of the guided-step ops: one pass over memory, compiler-vectorized, multi-threaded.
//
// Network outputs in another dtype than x are converted a chunk at a time into a small buffer
// that stays in L1, so each input is read from memory once and the output written once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../ops.h"

namespace ag_kernels {
namespace {

constexpr int64_t kChunk = 1024;  // elements per conversion buffer: 8 KB of double, well inside L1
constexpr int64_t kGrain = 32768;  // elements per parallel task, as ATen's own elementwise loops

// Elements [i, i + n) of src converted to T into buf, in a plain loop.  bf16 -> float is a bit
// shift and vectorizes; fp16 -> float stays a software conversion at the baseline ISA (no F16C),
// still 1.4x faster than at::vec::convert's generic path (measured, heun_step at 2^20).
template <typename T, typename S>
const T* convert_into(const void* base, int64_t i, int64_t n, T* buf) {
  const S* src = static_cast<const S*>(base) + i;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(static_cast<float>(src[j]));
  return buf;
}

// Elements [i, i + n) of a network output as T: the tensor's own memory when it is already T,
// else converted into buf.
template <typename T>
const T* as_compute(const void* base, DType type, int64_t i, int64_t n, T* buf) {
  switch (type) {
    case DType::kHalf:
      return convert_into<T, c10::Half>(base, i, n, buf);
    case DType::kBFloat16:
      return convert_into<T, c10::BFloat16>(base, i, n, buf);
    case DType::kFloat:
      if constexpr (std::is_same_v<T, float>) return static_cast<const float*>(base) + i;
      return convert_into<T, float>(base, i, n, buf);
    default:
      if constexpr (std::is_same_v<T, double>) return static_cast<const double*>(base) + i;
      // float64 outputs with a float32 x: one rounding, double -> float, as torch's .to(float32).
      {
        const double* src = static_cast<const double*>(base) + i;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(src[j]);
        return buf;
      }
  }
}

// Elements [begin, end) of one sample (one set of row constants).
//
// A plain loop over T that the compiler vectorizes (omp simd) for the build's baseline ISA:
// at::vec::Vectorized without a CPU_CAPABILITY build is ATen's generic fallback, which the
// benchmark showed compute-bound (heun_step at ~5 cycles per element, no gain from threads).
template <int OP, bool HAS_GUIDE, typename T>
void step_span(const StepArgs& a, const RowConstants<T>& r, int64_t begin, int64_t end, T* buf1, T* buf0) {
  T* out = static_cast<T*>(a.out);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    const T* D_1 = as_compute<T>(a.d_main, a.d_main_type, i, n, buf1);
    const T* D_0 = HAS_GUIDE ? as_compute<T>(a.d_guide, a.d_guide_type, i, n, buf0) : nullptr;
    const T* x = OP != kDenoise ? static_cast<const T*>(a.x) + i : nullptr;
    const T* x_euler = OP == kHeun ? static_cast<const T*>(a.x_euler) + i : nullptr;
    T* o = out + i;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T sx = OP != kDenoise ? x[j] : T(0);
      const T sxe = OP == kHeun ? x_euler[j] : T(0);
      const T s0 = HAS_GUIDE ? D_0[j] : T(0);
      o[j] = step_value<OP, HAS_GUIDE>(r, sx, sxe, D_1[j], s0);
    }
  }
}

template <int OP, bool HAS_GUIDE, typename T>
void run_typed(const StepArgs& a) {
  at::parallel_for(0, a.numel, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) T buf1[kChunk];
    alignas(64) T buf0[kChunk];
    // A thread's range may cross samples: the row constants change at each sample boundary.
    for (int64_t i = begin; i < end;) {
      const int64_t row = i / a.row_numel;
      const int64_t stop = std::min(end, (row + 1) * a.row_numel);
      step_span<OP, HAS_GUIDE, T>(a, row_constants<OP, T>(a.coef, row), i, stop, buf1, buf0);
      i = stop;
    }
  });
}

struct Cpu {
  template <int OP>
  static void run(const StepArgs& a) {
    if (a.numel == 0) return;
    const bool guided = a.d_guide != nullptr;
    if (a.x_type == at::kDouble) {
      guided ? run_typed<OP, true, double>(a) : run_typed<OP, false, double>(a);
    } else {
      guided ? run_typed<OP, true, float>(a) : run_typed<OP, false, float>(a);
    }
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(ag_kernels, CPU, m) { AG_KERNELS_REGISTER_STEP_OPS(m, Cpu); }

}  // namespace ag_kernels
