// The five op entry points, written once and instantiated per device backend.
//
// A backend is a type with `template <int OP> static void run(const StepArgs&)`; the signatures
// below match the schemas in ag_kernels.cpp (and the Triton ops' schemas, see ag_kernels/ops.py).
#pragma once

#include "step_args.h"

namespace ag_kernels {

template <typename Backend>
struct StepOps {
  using OptTensor = std::optional<at::Tensor>;

  // Every op ends with CFG's third output: d_uncond, its per-sample weight c_vec, or the number c.
  static void guided_denoise(at::Tensor& out, const at::Tensor& d_main, const OptTensor& d_guide,
                             const OptTensor& g_vec, double g, const OptTensor& d_uncond, const OptTensor& c_vec,
                             double c) {
    Backend::template run<kDenoise>(make_step_args("guided_denoise", out, nullptr, "", nullptr, d_main, d_guide,
                                                   g_vec, std::nullopt, std::nullopt, g, 1.0, 1.0,
                                                   Uncond{d_uncond, c_vec, c}));
  }

  static void euler_step(at::Tensor& out, const at::Tensor& x_hat, const at::Tensor& d_main, const OptTensor& d_guide,
                         const OptTensor& g_vec, const OptTensor& s_vec, const OptTensor& sn_vec, double g, double s,
                         double sn, const OptTensor& d_uncond, const OptTensor& c_vec, double c) {
    Backend::template run<kEuler>(make_step_args("euler_step", out, &x_hat, "x_hat", nullptr, d_main, d_guide, g_vec,
                                                 s_vec, sn_vec, g, s, sn, Uncond{d_uncond, c_vec, c}));
  }

  static void heun_step(at::Tensor& out, const at::Tensor& x_hat, const at::Tensor& x_euler, const at::Tensor& d_main,
                        const OptTensor& d_guide, const OptTensor& g_vec, const OptTensor& s_vec,
                        const OptTensor& sn_vec, double g, double s, double sn, const OptTensor& d_uncond,
                        const OptTensor& c_vec, double c) {
    Backend::template run<kHeun>(make_step_args("heun_step", out, &x_hat, "x_hat", &x_euler, d_main, d_guide, g_vec,
                                                s_vec, sn_vec, g, s, sn, Uncond{d_uncond, c_vec, c}));
  }

  static void guided_score(at::Tensor& out, const at::Tensor& x, const at::Tensor& d_main, const OptTensor& d_guide,
                           const OptTensor& g_vec, const OptTensor& s_vec, double g, double s,
                           const OptTensor& d_uncond, const OptTensor& c_vec, double c) {
    Backend::template run<kScore>(make_step_args("guided_score", out, &x, "x", nullptr, d_main, d_guide, g_vec, s_vec,
                                                 std::nullopt, g, s, 1.0, Uncond{d_uncond, c_vec, c}));
  }

  static void multistep_step(at::Tensor& out, at::Tensor& history, const at::Tensor& x, const at::Tensor& d_main,
                             const OptTensor& d_guide, const OptTensor& g_vec, double g, double a, double b0,
                             double b1, double b2, int64_t read1, int64_t read2, int64_t write,
                             const OptTensor& corrected, double ac, double c0, double c1, double c2,
                             const OptTensor& d_uncond, const OptTensor& c_vec, double c) {
    Backend::template run<kMultistep>(make_multistep_args(out, history, x, d_main, d_guide, g_vec, g, a, b0, b1, b2,
                                                          read1, read2, write, corrected, ac, c0, c1, c2,
                                                          Uncond{d_uncond, c_vec, c}));
  }
};

// Registers the five ops of `Backend` for one dispatch key.
#define AG_KERNELS_REGISTER_STEP_OPS(m, Backend)                           \
  do {                                                                     \
    m.impl("guided_denoise", &::ag_kernels::StepOps<Backend>::guided_denoise); \
    m.impl("euler_step", &::ag_kernels::StepOps<Backend>::euler_step);     \
    m.impl("heun_step", &::ag_kernels::StepOps<Backend>::heun_step);       \
    m.impl("guided_score", &::ag_kernels::StepOps<Backend>::guided_score); \
    m.impl("multistep_step", &::ag_kernels::StepOps<Backend>::multistep_step); \
  } while (0)

}  // namespace ag_kernels
