// CUDA implementation of the guided-step ops, shared by their translation units: one pass over
// memory, 16-byte loads, grid-stride.
//
// Layout: this header holds the templates; each op's <op>_cuda.cu instantiates them for that op only
// (cuda_step<OP> below), so ninja compiles the ops in parallel; register_cuda.cu registers the ops.
//
// One kernel template covers every op and dtype combination: OP, HAS_GUIDE and HAS_UNCOND pick the
// math (step_math.h, shared with the CPU), T is x's dtype, DM/DG the network outputs' dtypes, which
// are converted in registers; CFG's third output d_uncond has d_main's dtype DM (the public API
// converts both to T when they differ, which rounds as the conversion in registers would).  Offsets are 64-bit.  The launch allocates nothing and never
// synchronizes, so the ops can be captured in a CUDA graph.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../step_args.h"

namespace ag_kernels {

// The CUDA implementation of op OP (kDenoise ... kMultistep): one specialization per op, each defined
// in that op's translation unit.
template <int OP>
void cuda_step(const StepArgs& a);
template <>
void cuda_step<kDenoise>(const StepArgs& a);
template <>
void cuda_step<kEuler>(const StepArgs& a);
template <>
void cuda_step<kHeun>(const StepArgs& a);
template <>
void cuda_step<kScore>(const StepArgs& a);
template <>
void cuda_step<kMultistep>(const StepArgs& a);

// Internal linkage: every translation unit has its own copy of the templates it instantiates.
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // resident blocks per SM at 256 threads; the grid strides over the rest

// N elements loaded or stored together: 16-byte accesses (the widest per thread) where N * sizeof(U)
// allows, so the narrowest operand of a step moves in 16-byte loads and the wider ones in several.
template <typename U, int N>
struct alignas(sizeof(U) * N < 16 ? sizeof(U) * N : 16) Pack {
  U v[N];
};

template <typename T, typename U>
__device__ __forceinline__ T to_compute(U v) {
  // 16-bit network outputs go through float, their exact widening.
  if constexpr (std::is_same_v<U, c10::Half> || std::is_same_v<U, c10::BFloat16>) {
    return static_cast<T>(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

// Elements per pack: one 16-byte load of the narrowest operand.
template <typename T, typename DM, typename DG>
constexpr int pack_size() {
  return static_cast<int>(16 / std::min({sizeof(T), sizeof(DM), sizeof(DG)}));
}

template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T, typename DM, typename DG>
__device__ __forceinline__ void step_element(const StepArgs& a, const RowConstants<T>& r, int64_t i) {
  const T x = OP != kDenoise ? static_cast<const T*>(a.x)[i] : T(0);
  const T x_euler = OP == kHeun ? static_cast<const T*>(a.x_euler)[i] : T(0);
  const T D_1 = to_compute<T>(static_cast<const DM*>(a.d_main)[i]);
  const T D_0 = HAS_GUIDE ? to_compute<T>(static_cast<const DG*>(a.d_guide)[i]) : T(0);
  const T D_u = HAS_UNCOND ? to_compute<T>(static_cast<const DM*>(a.d_uncond)[i]) : T(0);
  if constexpr (OP == kMultistep) {
    // Both history slots are read before D_w is written: the write slot may be a read one.
    const T* history = static_cast<const T*>(a.ms.history);
    const T h1 = a.ms.read1 >= 0 ? history[a.ms.read1 * a.numel + i] : T(0);
    const T h2 = a.ms.read2 >= 0 ? history[a.ms.read2 * a.numel + i] : T(0);
    const T D_w = guided_value<HAS_GUIDE, HAS_UNCOND>(r, D_1, D_0, D_u);
    const MultistepConstants<T> m(a.ms);
    T x_c = x;
    if (a.ms.corrected != nullptr) {
      // UniPC: x is the previous corrected sample; x_c is kept, and the prediction starts from it.
      x_c = corrector_value(m, x, D_w, h1, h2);
      static_cast<T*>(a.ms.corrected)[i] = x_c;
    }
    static_cast<T*>(a.out)[i] = multistep_value(m, x_c, D_w, h1, h2);
    if (a.ms.write >= 0) static_cast<T*>(a.ms.history)[a.ms.write * a.numel + i] = D_w;
  } else {
    static_cast<T*>(a.out)[i] = step_value<OP, HAS_GUIDE, HAS_UNCOND>(r, x, x_euler, D_1, D_0, D_u);
  }
}

// Elements [base, base + len) of one sample; packs of N elements when every operand is aligned.
template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T, typename DM, typename DG>
__device__ __forceinline__ void step_range(const StepArgs& a, const RowConstants<T>& r, int64_t base, int64_t len,
                                           int64_t lane, int64_t lanes, bool vectorized) {
  constexpr int N = pack_size<T, DM, DG>();
  int64_t done = 0;
  if (vectorized) {
    const int64_t packs = len / N;
    for (int64_t p = lane; p < packs; p += lanes) {
      const int64_t i = base + p * N;
      Pack<T, N> x{}, x_euler{}, out;
      Pack<DM, N> d1 = *reinterpret_cast<const Pack<DM, N>*>(static_cast<const DM*>(a.d_main) + i);
      Pack<DG, N> d0{};
      Pack<DM, N> du{};
      if constexpr (OP != kDenoise) x = *reinterpret_cast<const Pack<T, N>*>(static_cast<const T*>(a.x) + i);
      if constexpr (OP == kHeun) x_euler = *reinterpret_cast<const Pack<T, N>*>(static_cast<const T*>(a.x_euler) + i);
      if constexpr (HAS_GUIDE) d0 = *reinterpret_cast<const Pack<DG, N>*>(static_cast<const DG*>(a.d_guide) + i);
      if constexpr (HAS_UNCOND) du = *reinterpret_cast<const Pack<DM, N>*>(static_cast<const DM*>(a.d_uncond) + i);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        out.v[k] = step_value<OP, HAS_GUIDE, HAS_UNCOND>(r, x.v[k], x_euler.v[k], to_compute<T>(d1.v[k]),
                                                         HAS_GUIDE ? to_compute<T>(d0.v[k]) : T(0),
                                                         HAS_UNCOND ? to_compute<T>(du.v[k]) : T(0));
      }
      *reinterpret_cast<Pack<T, N>*>(static_cast<T*>(a.out) + i) = out;
    }
    done = packs * N;
  }
  for (int64_t k = done + lane; k < len; k += lanes) {
    step_element<OP, HAS_GUIDE, HAS_UNCOND, T, DM, DG>(a, r, base + k);
  }
}

template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T, typename DM, typename DG>
__global__ void __launch_bounds__(kThreads) guided_step_kernel(const StepArgs a, bool vectorized, bool tiled) {
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t lanes = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (tiled) {
    // Samples of at least a block: blocks along y take samples, so each thread forms its sample's
    // coefficients once (Karras et al. 2024: per-sample guidance weight w and noise levels).
    for (int64_t row = blockIdx.y; row < a.rows; row += gridDim.y) {
      const RowConstants<T> r = row_constants<OP, T>(a.coef, row);
      step_range<OP, HAS_GUIDE, HAS_UNCOND, T, DM, DG>(a, r, row * a.row_numel, a.row_numel, lane, lanes,
                                                       vectorized);
    }
  } else {
    // Samples shorter than a block (2-D toy points, small latents): each element finds its sample.
    for (int64_t i = lane; i < a.numel; i += lanes) {
      step_element<OP, HAS_GUIDE, HAS_UNCOND, T, DM, DG>(a, row_constants<OP, T>(a.coef, i / a.row_numel), i);
    }
  }
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Multiprocessors of the current device (a host-side attribute query: no sync, capture-safe).
inline int64_t multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T, typename DM, typename DG>
void launch(const StepArgs& a) {
  constexpr int N = pack_size<T, DM, DG>();
  const bool tiled = a.rows == 1 || a.row_numel >= static_cast<int64_t>(kThreads) * N;
  // Packs never straddle samples (row_numel % N == 0) and every operand is aligned to its pack.
  // The multistep update goes element by element (it also reads and writes the history).
  bool vectorized = OP != kMultistep && tiled && (a.rows == 1 || a.row_numel % N == 0) &&
                    aligned(a.out, alignof(Pack<T, N>)) &&
                    aligned(a.d_main, alignof(Pack<DM, N>));
  if (OP != kDenoise) vectorized = vectorized && aligned(a.x, alignof(Pack<T, N>));
  if (OP == kHeun) vectorized = vectorized && aligned(a.x_euler, alignof(Pack<T, N>));
  if (HAS_GUIDE) vectorized = vectorized && aligned(a.d_guide, alignof(Pack<DG, N>));
  if (HAS_UNCOND) vectorized = vectorized && aligned(a.d_uncond, alignof(Pack<DM, N>));

  const int64_t max_blocks = multiprocessors() * kBlocksPerSm;
  dim3 grid(1, 1, 1);
  if (tiled) {
    const int64_t work = vectorized ? (a.row_numel + N - 1) / N : a.row_numel;
    const int64_t rows = std::min<int64_t>(a.rows, 65535);
    const int64_t per_row = std::max<int64_t>(1, max_blocks / rows);
    grid.x = static_cast<unsigned>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, per_row));
    grid.y = static_cast<unsigned>(rows);
  } else {
    grid.x = static_cast<unsigned>(std::clamp<int64_t>((a.numel + kThreads - 1) / kThreads, 1, max_blocks));
  }
  guided_step_kernel<OP, HAS_GUIDE, HAS_UNCOND, T, DM, DG>
      <<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a, vectorized, tiled);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f with a value of the C++ type of a network-output dtype.
template <typename F>
void with_d_type(DType type, F&& f) {
  switch (type) {
    case DType::kHalf: return f(c10::Half());
    case DType::kBFloat16: return f(c10::BFloat16());
    case DType::kFloat: return f(float());
    default: return f(double());
  }
}

// The kernels of op OP with or without CFG's third output: x's dtype by the network outputs' dtypes,
// with and without guidance.
template <int OP, bool HAS_UNCOND>
void run_outputs(const StepArgs& a) {
  auto for_x = [&](auto x_value) {
    using T = decltype(x_value);
    with_d_type(a.d_main_type, [&](auto dm_value) {
      using DM = decltype(dm_value);
      if (a.d_guide == nullptr) {
        launch<OP, false, HAS_UNCOND, T, DM, DM>(a);
      } else {
        with_d_type(a.d_guide_type,
                    [&](auto dg_value) { launch<OP, true, HAS_UNCOND, T, DM, decltype(dg_value)>(a); });
      }
    });
  };
  if (a.x_type == at::kDouble) {
    for_x(double());
  } else {
    for_x(float());
  }
}

// Every kernel of op OP.
template <int OP>
void run_step(const StepArgs& a) {
  if (a.numel == 0) return;
  const c10::cuda::CUDAGuard guard(a.device);
  if (a.d_uncond == nullptr) {
    run_outputs<OP, false>(a);
  } else {
    TORCH_CHECK(a.d_uncond_type == a.d_main_type,
                "ag_kernels (CUDA): d_uncond must have d_main's dtype (the public ag_kernels API converts both to "
                "x's dtype when they differ)");
    run_outputs<OP, true>(a);
  }
}

}  // namespace
}  // namespace ag_kernels
