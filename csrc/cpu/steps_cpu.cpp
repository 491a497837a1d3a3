// CPU implementation of the guided-step ops: one pass over memory, compiler-vectorized, multi-threaded.
//
// Network outputs in another dtype than x are converted a chunk at a time into a small buffer
// that stays in L1, so each input is read from memory once and the output written once.
//
// The hot loops are compiled three times on x86-64 (baseline SSE2, AVX2+FMA+F16C, AVX-512) and
// one variant is picked when the library loads (cpu_isa.h).  Each variant is an entry function
// with a GCC/Clang target attribute that inlines the one always-inline template below: a target
// attribute does not leak into the out-of-line copies of header functions (as -mavx512f on the
// whole file could, through the linker's choice among identical inline definitions).  The build
// uses -ffp-contract=off, so no variant fuses a multiply and an add: all give bitwise equal results.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "cpu_isa.h"

// Other architectures and compilers get the baseline variant only (as does a build with
// -DAG_KERNELS_NO_ISA_DISPATCH, which checks that path compiles).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AG_KERNELS_NO_ISA_DISPATCH)
#define AG_KERNELS_X86_DISPATCH 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define AG_KERNELS_X86_DISPATCH 0
#endif

#if defined(__clang__)
// Clang contracts a*b+c into an FMA by default, which would make the AVX2/AVX-512 results differ.
#pragma clang fp contract(off)
#endif

#if AG_KERNELS_X86_DISPATCH
#define AG_KERNELS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(__clang__)
#define AG_KERNELS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
// 256-bit vectors in the loops: with 512-bit ones the memory-bound sizes (2^20 elements and up)
// ran 10-20% slower on the AMD EPYC (Zen 4) machine, and nothing was faster (measured).
#define AG_KERNELS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=256")))
#endif
#endif

namespace ag_kernels {
namespace {

constexpr int64_t kChunk = 1024;  // elements per conversion buffer: 8 KB of double, well inside L1

// A call that reads and writes at most this many bytes runs on one thread; a larger one is split
// into tasks of at least half this.  Measured on the 2-core AMD EPYC machine (AVX-512 variant,
// idle machine): at 2^14 elements (192-320 KB) one thread and two were within 1 us of each other,
// from 2^15 elements (384 KB) on two threads won; a second thread costs about 2 us to start.
constexpr int64_t kGrainBytes = 256 * 1024;

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"default", "avx2", "avx512"};

// ---------------------------------------------------------------------------------------------
// Conversions of network outputs to the compute dtype, one chunk at a time.

#if AG_KERNELS_X86_DISPATCH
// fp16 -> float with F16C's vcvtph2ps: exact, as the software conversion, at one instruction per 8.
AG_KERNELS_TARGET_AVX2 void half_to_float_avx2(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
  }
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j].x);
}

// The same with 16 lanes, and a masked tail instead of a scalar one.  (The maskz form of the
// conversion, all lanes set, avoids GCC 12's false uninitialized warning in _mm512_cvtph_ps.)
AG_KERNELS_TARGET_AVX512 void half_to_float_avx512(const c10::Half* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
    _mm512_storeu_ps(dst + j, _mm512_maskz_cvtph_ps(static_cast<__mmask16>(0xFFFF), h));
  }
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
    _mm512_mask_storeu_ps(dst + j, m, _mm512_maskz_cvtph_ps(m, _mm256_maskz_loadu_epi16(m, src + j)));
  }
}
#endif

// fp16 -> float: hardware conversion where the variant has it (a call per chunk), else a software loop.
template <Isa ISA>
C10_ALWAYS_INLINE void half_to_float(const c10::Half* src, float* dst, int64_t n) {
#if AG_KERNELS_X86_DISPATCH
  if constexpr (ISA == Isa::kAvx512) {
    half_to_float_avx512(src, dst, n);
    return;
  } else if constexpr (ISA == Isa::kAvx2) {
    half_to_float_avx2(src, dst, n);
    return;
  }
#endif
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Elements [0, n) of src converted to T in a plain loop; bf16 -> float is a 16-bit shift and
// float/double conversions are single instructions, which the compiler vectorizes for each variant.
template <typename T, typename S>
C10_ALWAYS_INLINE void convert_plain(const S* src, int64_t n, T* dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (std::is_same_v<S, double>) {
      dst[j] = static_cast<T>(src[j]);  // one rounding, double -> float, as torch's .to(float32)
    } else {
      dst[j] = static_cast<T>(static_cast<float>(src[j]));
    }
  }
}

// Elements [i, i + n) of a network output as T: the tensor's own memory when it is already T,
// else converted into buf.
template <Isa ISA, typename T>
C10_ALWAYS_INLINE const T* as_compute(const void* base, DType type, int64_t i, int64_t n, T* buf) {
  switch (type) {
    case DType::kHalf: {
      const c10::Half* src = static_cast<const c10::Half*>(base) + i;
      if constexpr (std::is_same_v<T, float>) {
        half_to_float<ISA>(src, buf, n);
      } else {
        // Exact to float, then exact to double.
        alignas(64) float tmp[kChunk];
        half_to_float<ISA>(src, tmp, n);
        convert_plain<T, float>(tmp, n, buf);
      }
      return buf;
    }
    case DType::kBFloat16:
      convert_plain<T, c10::BFloat16>(static_cast<const c10::BFloat16*>(base) + i, n, buf);
      return buf;
    case DType::kFloat:
      if constexpr (std::is_same_v<T, float>) return static_cast<const float*>(base) + i;
      convert_plain<T, float>(static_cast<const float*>(base) + i, n, buf);
      return buf;
    default:
      if constexpr (std::is_same_v<T, double>) return static_cast<const double*>(base) + i;
      convert_plain<T, double>(static_cast<const double*>(base) + i, n, buf);
      return buf;
  }
}

// ---------------------------------------------------------------------------------------------
// The step loop, compiled once per variant.

// Elements [begin, end) of the flattened tensors, one chunk at a time, with each sample's row
// constants.  A plain loop over T that the compiler vectorizes (omp simd) for the caller's ISA:
// at::vec::Vectorized without a CPU_CAPABILITY build is ATen's generic fallback, which the
// benchmark showed compute-bound.
template <Isa ISA, int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T>
C10_ALWAYS_INLINE void step_range(const StepArgs& a, int64_t begin, int64_t end) {
  alignas(64) T buf1[kChunk];
  alignas(64) T buf0[kChunk];
  alignas(64) T bufu[HAS_UNCOND ? kChunk : 1];
  T* out = static_cast<T*>(a.out);
  // Multistep: the history slots it reads (or a zero chunk with a zero coefficient) and the one it writes.
  alignas(64) T zeros[kChunk] = {};
  T* history = static_cast<T*>(a.ms.history);
  const MultistepConstants<T> m(a.ms);
  // A range may cross samples: the row constants change at each sample boundary.
  for (int64_t row_begin = begin; row_begin < end;) {
    const int64_t row = row_begin / a.row_numel;
    const int64_t row_end = std::min(end, (row + 1) * a.row_numel);
    const RowConstants<T> r = row_constants<OP, T>(a.coef, row);
    for (int64_t i = row_begin; i < row_end; i += kChunk) {
      const int64_t n = std::min(kChunk, row_end - i);
      const T* D_1 = as_compute<ISA, T>(a.d_main, a.d_main_type, i, n, buf1);
      const T* D_0 = HAS_GUIDE ? as_compute<ISA, T>(a.d_guide, a.d_guide_type, i, n, buf0) : nullptr;
      const T* D_u = nullptr;
      if constexpr (HAS_UNCOND) D_u = as_compute<ISA, T>(a.d_uncond, a.d_uncond_type, i, n, bufu);
      const T* x = OP != kDenoise ? static_cast<const T*>(a.x) + i : nullptr;
      const T* x_euler = OP == kHeun ? static_cast<const T*>(a.x_euler) + i : nullptr;
      T* o = out + i;
      if constexpr (OP == kMultistep) {
        // Every slot is read before D_w is written, element by element: the write slot may be a read one.
        const T* h1 = a.ms.read1 >= 0 ? history + a.ms.read1 * a.numel + i : zeros;
        const T* h2 = a.ms.read2 >= 0 ? history + a.ms.read2 * a.numel + i : zeros;
        T* hw = a.ms.write >= 0 ? history + a.ms.write * a.numel + i : nullptr;
        if (a.ms.corrected != nullptr) {
          // UniPC: x (the previous corrected sample) is corrected first, x_c kept, then the prediction from x_c.
          T* xc = static_cast<T*>(a.ms.corrected) + i;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const T D_w = guided_value<HAS_GUIDE, HAS_UNCOND>(r, D_1[j], HAS_GUIDE ? D_0[j] : T(0),
                                                              HAS_UNCOND ? D_u[j] : T(0));
            const T h1j = h1[j], h2j = h2[j];
            const T x_c = corrector_value(m, x[j], D_w, h1j, h2j);
            xc[j] = x_c;
            o[j] = multistep_value(m, x_c, D_w, h1j, h2j);
            if (hw != nullptr) hw[j] = D_w;
          }
        } else if (hw != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const T D_w = guided_value<HAS_GUIDE, HAS_UNCOND>(r, D_1[j], HAS_GUIDE ? D_0[j] : T(0),
                                                              HAS_UNCOND ? D_u[j] : T(0));
            o[j] = multistep_value(m, x[j], D_w, h1[j], h2[j]);
            hw[j] = D_w;
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const T D_w = guided_value<HAS_GUIDE, HAS_UNCOND>(r, D_1[j], HAS_GUIDE ? D_0[j] : T(0),
                                                              HAS_UNCOND ? D_u[j] : T(0));
            o[j] = multistep_value(m, x[j], D_w, h1[j], h2[j]);
          }
        }
        continue;
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const T sx = OP != kDenoise ? x[j] : T(0);
        const T sxe = OP == kHeun ? x_euler[j] : T(0);
        const T s0 = HAS_GUIDE ? D_0[j] : T(0);
        const T su = HAS_UNCOND ? D_u[j] : T(0);
        o[j] = step_value<OP, HAS_GUIDE, HAS_UNCOND>(r, sx, sxe, D_1[j], s0, su);
      }
    }
    row_begin = row_end;
  }
}

// One entry function per variant: only the target attribute differs.
template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T>
void step_range_default(const StepArgs& a, int64_t begin, int64_t end) {
  step_range<Isa::kDefault, OP, HAS_GUIDE, HAS_UNCOND, T>(a, begin, end);
}

#if AG_KERNELS_X86_DISPATCH
template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T>
AG_KERNELS_TARGET_AVX2 void step_range_avx2(const StepArgs& a, int64_t begin, int64_t end) {
  step_range<Isa::kAvx2, OP, HAS_GUIDE, HAS_UNCOND, T>(a, begin, end);
}

template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T>
AG_KERNELS_TARGET_AVX512 void step_range_avx512(const StepArgs& a, int64_t begin, int64_t end) {
  step_range<Isa::kAvx512, OP, HAS_GUIDE, HAS_UNCOND, T>(a, begin, end);
}
#endif

// ---------------------------------------------------------------------------------------------
// Choice of the variant.

bool isa_supported(Isa isa) {
#if AG_KERNELS_X86_DISPATCH
  // __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 registers (XCR0).
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
  switch (isa) {
    case Isa::kDefault: return true;
    case Isa::kAvx2: return avx2;
    case Isa::kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::kDefault;
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (isa_supported(isa)) return isa;
  }
  return Isa::kDefault;
}

bool isa_from_name(const std::string& name, Isa* isa) {
  for (int k = 0; k < 3; ++k) {
    if (name == kIsaNames[k]) {
      *isa = static_cast<Isa>(k);
      return true;
    }
  }
  return false;
}

// The best supported variant, or AG_KERNELS_CPU_ISA's; a request that cannot be met is reported
// on stderr (the library is loading: there is no caller to raise to) and the best one used.
Isa initial_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("AG_KERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa want;
  if (!isa_from_name(env, &want)) {
    std::fprintf(stderr, "ag_kernels: AG_KERNELS_CPU_ISA=%s is not one of default|avx2|avx512; using %s\n", env,
                 kIsaNames[static_cast<int>(best)]);
    return best;
  }
  if (!isa_supported(want)) {
    std::fprintf(stderr, "ag_kernels: AG_KERNELS_CPU_ISA=%s is not supported by this CPU or build; using %s\n", env,
                 kIsaNames[static_cast<int>(best)]);
    return best;
  }
  return want;
}

std::atomic<int> g_isa{static_cast<int>(initial_isa())};

// ---------------------------------------------------------------------------------------------
// The ops.

constexpr int64_t size_of(DType t) {
  return t == DType::kHalf || t == DType::kBFloat16 ? 2 : t == DType::kFloat ? 4 : 8;
}

template <int OP, bool HAS_GUIDE, bool HAS_UNCOND, typename T>
void run_typed(const StepArgs& a) {
  using RangeFn = void (*)(const StepArgs&, int64_t, int64_t);
  RangeFn fn = &step_range_default<OP, HAS_GUIDE, HAS_UNCOND, T>;
#if AG_KERNELS_X86_DISPATCH
  switch (static_cast<Isa>(g_isa.load(std::memory_order_relaxed))) {
    case Isa::kAvx512: fn = &step_range_avx512<OP, HAS_GUIDE, HAS_UNCOND, T>; break;
    case Isa::kAvx2: fn = &step_range_avx2<OP, HAS_GUIDE, HAS_UNCOND, T>; break;
    default: break;
  }
#endif
  // The grain in elements from the bytes each element moves: out, x, x_euler and the network outputs.
  const int64_t t_streams = 1 + (OP != kDenoise ? 1 : 0) + (OP == kHeun ? 1 : 0) + (OP == kMultistep ? 3 : 0);
  const int64_t bytes = t_streams * static_cast<int64_t>(sizeof(T)) + size_of(a.d_main_type) +
                        (HAS_GUIDE ? size_of(a.d_guide_type) : 0) + (HAS_UNCOND ? size_of(a.d_uncond_type) : 0);
  const int64_t grain = std::max<int64_t>(kChunk, kGrainBytes / bytes);
  if (a.numel <= grain) {
    fn(a, 0, a.numel);  // no parallel region at all: its setup alone costs about a microsecond
    return;
  }
  at::parallel_for(0, a.numel, grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

// The instantiation for the network outputs present: d_main, and d_guide and/or d_uncond or neither.
template <int OP, typename T>
void run_outputs(const StepArgs& a) {
  const bool guided = a.d_guide != nullptr;
  if (a.d_uncond == nullptr) {
    guided ? run_typed<OP, true, false, T>(a) : run_typed<OP, false, false, T>(a);
  } else {
    guided ? run_typed<OP, true, true, T>(a) : run_typed<OP, false, true, T>(a);
  }
}

struct Cpu {
  template <int OP>
  static void run(const StepArgs& a) {
    if (a.numel == 0) return;
    if (a.x_type == at::kDouble) {
      run_outputs<OP, double>(a);
    } else {
      run_outputs<OP, float>(a);
    }
  }
};

}  // namespace

std::string cpu_isa() { return kIsaNames[g_isa.load()]; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (int k = 0; k < 3; ++k) {
    if (isa_supported(static_cast<Isa>(k))) names.emplace_back(kIsaNames[k]);
  }
  return names;
}

std::string set_cpu_isa(const std::string& name) {
  Isa isa;
  if (!isa_from_name(name, &isa)) {
    throw std::invalid_argument("unknown CPU ISA variant '" + name + "' (expected default, avx2 or avx512)");
  }
  if (!isa_supported(isa)) {
    throw std::invalid_argument("CPU ISA variant '" + name + "' is not supported by this CPU or build");
  }
  return kIsaNames[g_isa.exchange(static_cast<int>(isa))];
}

TORCH_LIBRARY_IMPL(ag_kernels, CPU, m) { AG_KERNELS_REGISTER_STEP_OPS(m, Cpu); }

}  // namespace ag_kernels
