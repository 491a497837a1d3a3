// Checked, device-independent view of the arguments of one guided-step op call.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include "step_math.h"

namespace ag_kernels {

struct StepArgs {
  int64_t numel = 0;
  int64_t rows = 1;        // samples whose coefficients differ (1 when every coefficient is a number)
  int64_t row_numel = 0;   // elements per sample, contiguous in memory (numel when rows == 1)
  at::ScalarType x_type = at::kFloat;   // compute dtype: out's (float/double)
  at::Device device{at::kCPU};
  void* out = nullptr;
  const void* x = nullptr;        // x_hat / x; nullptr for guided_denoise
  const void* x_euler = nullptr;  // heun only
  const void* d_main = nullptr;
  const void* d_guide = nullptr;  // nullptr: no guidance
  const void* d_uncond = nullptr;  // nullptr: no CFG term
  DType d_main_type = DType::kFloat;
  DType d_guide_type = DType::kFloat;
  DType d_uncond_type = DType::kFloat;
  Coefficients coef;
  Multistep ms;  // multistep_step only
};

// CFG's third output and its weight (every op takes them last; d_uncond absent: no CFG term).
struct Uncond {
  const std::optional<at::Tensor>& d_uncond;
  const std::optional<at::Tensor>& c_vec;
  double c;
};

// Checks every argument (naming it in the error) and returns the raw view the kernels use.
// All tensors must have out's shape, device and strides, and be non-overlapping and dense.
StepArgs make_step_args(
    const char* op, const at::Tensor& out, const at::Tensor* x, const char* x_name, const at::Tensor* x_euler,
    const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide, const std::optional<at::Tensor>& g_vec,
    const std::optional<at::Tensor>& s_vec, const std::optional<at::Tensor>& sn_vec, double g, double s, double sn,
    const Uncond& uncond);

// make_step_args for multistep_step, plus its history (contiguous [K, *out.shape] in out's dtype; out
// contiguous), slots (-1: none) and optional corrector (its output `corrected`: out's shape, dtype and
// layout, x itself or apart from every operand).
StepArgs make_multistep_args(const at::Tensor& out, const at::Tensor& history, const at::Tensor& x,
                             const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                             const std::optional<at::Tensor>& g_vec, double g, double a, double b0, double b1,
                             double b2, int64_t read1, int64_t read2, int64_t write,
                             const std::optional<at::Tensor>& corrected, double ac, double c0, double c1, double c2,
                             const Uncond& uncond);

}  // namespace ag_kernels
