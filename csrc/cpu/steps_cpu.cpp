// CPU implementation of the guided-step ops: one pass over memory, SIMD and multi-threaded.
//
// Network outputs in another dtype than x are converted a chunk at a time into a small buffer
// that stays in L1, so each input is read from memory once and the output written once.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../ops.h"

namespace ag_kernels {
namespace {

constexpr int64_t kChunk = 1024;  // elements per conversion buffer: 8 KB of double, well inside L1
constexpr int64_t kGrain = 32768;  // elements per parallel task, as ATen's own elementwise loops

// Elements [i, i + n) of a network output as T: the tensor's own memory when it is already T,
// else converted into buf.
template <typename T>
const T* as_compute(const void* base, DType type, int64_t i, int64_t n, T* buf) {
  switch (type) {
    case DType::kHalf:
      at::vec::convert(static_cast<const c10::Half*>(base) + i, buf, n);
      return buf;
    case DType::kBFloat16:
      at::vec::convert(static_cast<const c10::BFloat16*>(base) + i, buf, n);
      return buf;
    case DType::kFloat:
      if constexpr (std::is_same_v<T, float>) return static_cast<const float*>(base) + i;
      at::vec::convert(static_cast<const float*>(base) + i, buf, n);
      return buf;
    default:
      if constexpr (std::is_same_v<T, double>) return static_cast<const double*>(base) + i;
      at::vec::convert(static_cast<const double*>(base) + i, buf, n);
      return buf;
  }
}

// Elements [begin, end) of one sample (one set of row constants).
template <int OP, bool HAS_GUIDE, typename T>
void step_span(const StepArgs& a, const RowConstants<T>& r, int64_t begin, int64_t end, T* buf1, T* buf0) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kWidth = Vec::size();
  T* out = static_cast<T*>(a.out);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    const T* D_1 = as_compute<T>(a.d_main, a.d_main_type, i, n, buf1);
    const T* D_0 = HAS_GUIDE ? as_compute<T>(a.d_guide, a.d_guide_type, i, n, buf0) : nullptr;
    const T* x = OP != kDenoise ? static_cast<const T*>(a.x) + i : nullptr;
    const T* x_euler = OP == kHeun ? static_cast<const T*>(a.x_euler) + i : nullptr;
    T* o = out + i;
    int64_t j = 0;
    for (; j + kWidth <= n; j += kWidth) {
      Vec vx(T(0)), vxe(T(0)), v0(T(0));
      if constexpr (OP != kDenoise) vx = Vec::loadu(x + j);
      if constexpr (OP == kHeun) vxe = Vec::loadu(x_euler + j);
      if constexpr (HAS_GUIDE) v0 = Vec::loadu(D_0 + j);
      step_value<OP, HAS_GUIDE>(r, vx, vxe, Vec::loadu(D_1 + j), v0).store(o + j);
    }
    for (; j < n; ++j) {
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
