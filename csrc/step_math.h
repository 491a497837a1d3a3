// The math of one guided sampler step, shared by the CPU and CUDA backends.
//
// Guided denoiser (Karras et al. 2024, Eq. 1): D_w = D_0 + w (D_1 - D_0), D_1 = d_main, D_0 = d_guide;
// with CFG's third output D_u = d_uncond and its weight w_cfg: D = D_w + (w_cfg - 1) (D_1 - D_u).
// Ops: D_w itself; an Euler step of the EDM ODE; Heun's correction; the guided score.  The
// coefficients (w, step ratios) are formed in double once per sample, then rounded once to the
// compute dtype T (x's dtype), exactly as the Triton kernel does, so the backends agree to an ulp.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace ag_kernels {

// Op codes, as the template parameter OP of every backend.
enum Op : int { kDenoise = 0, kEuler = 1, kHeun = 2, kScore = 3, kMultistep = 4 };

// Element types of the network outputs and per-sample coefficient tensors.
enum class DType : int8_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// A coefficient (guidance, sigma, sigma_next or cfg): a number, or one value per sample read at its row.
struct Coefficient {
  const void* ptr = nullptr;  // per-sample values, or nullptr for the scalar `value`
  int64_t stride = 0;
  double value = 1.0;
  DType type = DType::kDouble;

  C10_HOST_DEVICE double at(int64_t row) const {
    if (ptr == nullptr) return value;
    const int64_t k = row * stride;
    switch (type) {
      case DType::kHalf: return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(ptr)[k]));
      case DType::kBFloat16: return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[k]));
      case DType::kFloat: return static_cast<double>(static_cast<const float*>(ptr)[k]);
      default: return static_cast<const double*>(ptr)[k];
    }
  }
};

struct Coefficients {
  Coefficient g, s, sn;
  Coefficient cfg;  // w_cfg, the weight of D_1 - D_u (1 when there is no d_uncond)
  bool per_sample() const {
    return g.ptr != nullptr || s.ptr != nullptr || sn.ptr != nullptr || cfg.ptr != nullptr;
  }
};

// The per-sample constants of one step, in the compute dtype T.
template <typename T>
struct RowConstants {
  T w;        // guidance weight
  T one_minus_w;
  T k;        // Euler: (sn - s)/s; Heun: (sn - s)/(2 sn); score: 1/s^2
  bool lerp_from_guide;  // which end lerp starts from (w < 0.5), as torch.lerp
  T cfg_minus_1;         // w_cfg - 1, formed in double as the other coefficients
};

template <int OP, typename T>
C10_HOST_DEVICE RowConstants<T> row_constants(const Coefficients& c, int64_t row) {
  // Ratios of sigmas are formed in double: sigma spans 0.002..80, and the Heun ratio nears 0.
  const double w = c.g.at(row);
  RowConstants<T> r;
  r.w = static_cast<T>(w);
  r.one_minus_w = static_cast<T>(1.0 - w);
  r.lerp_from_guide = w < 0.5;
  r.cfg_minus_1 = static_cast<T>(c.cfg.at(row) - 1.0);
  r.k = T(0);
  if constexpr (OP == kEuler) {
    const double s = c.s.at(row), sn = c.sn.at(row);
    r.k = static_cast<T>((sn - s) / s);
  } else if constexpr (OP == kHeun) {
    const double s = c.s.at(row), sn = c.sn.at(row);
    r.k = static_cast<T>(0.5 * (sn - s) / sn);
  } else if constexpr (OP == kScore) {
    const double s = c.s.at(row);
    r.k = static_cast<T>(1.0 / (s * s));
  }
  return r;
}

// The guided denoiser of one element; D_1/D_0/D_u are already in T.  Without HAS_UNCOND, D_u is
// not read and the result is the two-output D_w, operation for operation.
template <bool HAS_GUIDE, bool HAS_UNCOND = false, typename V, typename T>
C10_HOST_DEVICE V guided_value(const RowConstants<T>& r, V D_1, V D_0, V D_u = V(0)) {
  V D_w = D_1;
  if constexpr (HAS_GUIDE) {
    // Two-sided lerp, as torch.lerp: w = 1 gives D_1 exactly (no guidance), and both ends stay accurate.
    const V diff = D_1 - D_0;
    D_w = r.lerp_from_guide ? D_0 + V(r.w) * diff : D_1 - diff * V(r.one_minus_w);
  }
  if constexpr (HAS_UNCOND) {
    // CFG on top: D_w + (w_cfg - 1) (D_1 - D_u); w_cfg = 1 adds an exact 0.
    D_w = D_w + V(r.cfg_minus_1) * (D_1 - D_u);
  }
  return D_w;
}

// The coefficients of a linear multistep update (DPM-Solver++, Lu et al. 2022), formed on the host in
// double, and where the history lives: x_next = a x + b0 D_w + b1 H[read1] + b2 H[read2]; H[write] = D_w.
// With a corrector (UniPC, Zhao et al. 2023), x is the previous corrected sample: first
// x_c = ac x + c0 D_w + c1 H[read1] + c2 H[read2], stored in `corrected`, then x_next from x_c.
struct Multistep {
  double a = 0, b0 = 0, b1 = 0, b2 = 0;
  void* history = nullptr;  // [K, numel] in the compute dtype, contiguous
  int64_t read1 = -1, read2 = -1, write = -1;  // slots; -1: none
  void* corrected = nullptr;  // nullptr: no corrector
  double ac = 0, c0 = 0, c1 = 0, c2 = 0;
};

template <typename T>
struct MultistepConstants {
  T a, b0, b1, b2, ac, c0, c1, c2;
  C10_HOST_DEVICE explicit MultistepConstants(const Multistep& m)
      : a(static_cast<T>(m.a)), b0(static_cast<T>(m.b0)), b1(static_cast<T>(m.b1)), b2(static_cast<T>(m.b2)),
        ac(static_cast<T>(m.ac)), c0(static_cast<T>(m.c0)), c1(static_cast<T>(m.c1)), c2(static_cast<T>(m.c2)) {}
};

// x_next of a multistep update, summed left to right as the torch reference does; a history slot
// that is not read enters as 0 with coefficient 0.
template <typename V, typename T>
C10_HOST_DEVICE V multistep_value(const MultistepConstants<T>& m, V x, V D_w, V h1, V h2) {
  return ((V(m.a) * x + V(m.b0) * D_w) + V(m.b1) * h1) + V(m.b2) * h2;
}

// x_c of a corrector, summed in the same order.
template <typename V, typename T>
C10_HOST_DEVICE V corrector_value(const MultistepConstants<T>& m, V x, V D_w, V h1, V h2) {
  return ((V(m.ac) * x + V(m.c0) * D_w) + V(m.c1) * h1) + V(m.c2) * h2;
}

// One step on values of type V: T itself on both devices (the CPU loop is vectorized by the compiler).
// x is x_hat (x for the score), xe is x_euler (Heun only); D_1/D_0/D_u are already in T.
template <int OP, bool HAS_GUIDE, bool HAS_UNCOND = false, typename V, typename T>
C10_HOST_DEVICE V step_value(const RowConstants<T>& r, V x, V xe, V D_1, V D_0, V D_u = V(0)) {
  const V D_w = guided_value<HAS_GUIDE, HAS_UNCOND>(r, D_1, D_0, D_u);
  if constexpr (OP == kDenoise) {
    return D_w;
  } else if constexpr (OP == kEuler) {
    // x_hat + (t_next - t_cur) d_cur with d_cur = (x_hat - D_w) / t_cur.
    return x + V(r.k) * (x - D_w);
  } else if constexpr (OP == kHeun) {
    // (t_next - t_cur) d_cur is x_euler - x_hat: the small step of the schedule's end is never divided by.
    return x + V(T(0.5)) * (xe - x) + V(r.k) * (xe - D_w);
  } else {
    return (D_w - x) * V(r.k);
  }
}

}  // namespace ag_kernels
