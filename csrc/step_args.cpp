// Argument checks shared by the CPU and CUDA implementations of the guided-step ops.
//
// The public API (ag_kernels/ops.py) has already validated and laid out the arguments; these
// checks keep a direct call of torch.ops.ag_kernels.* from reading out of bounds or returning
// garbage, and name the offending argument.
#include "step_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace ag_kernels {
namespace {

DType d_type_of(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default:
      TORCH_CHECK_TYPE(false, "ag_kernels::", op, ": ", name, " must have dtype float16/bfloat16/float32/float64, got ",
                       t.scalar_type());
  }
}

// Element strides of the dimensions that are not of size 1 (those do not place elements).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& out) {
  TORCH_CHECK(t.device() == out.device(), "ag_kernels::", op, ": ", name, " is on ", t.device(), " but out is on ",
              out.device());
  TORCH_CHECK(t.sizes() == out.sizes(), "ag_kernels::", op, ": ", name, " must have out's shape ", out.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.is_non_overlapping_and_dense() && same_layout(t, out), "ag_kernels::", op, ": ", name,
              " must be dense with out's strides ", out.strides(), ", got strides ", t.strides(),
              " (the public ag_kernels API arranges this)");
}

Coefficient coefficient(const char* op, const char* name, const std::optional<at::Tensor>& vec, double value,
                        const at::Tensor& out, int64_t batch) {
  Coefficient c;
  c.value = value;
  if (!vec.has_value()) return c;
  const at::Tensor& v = *vec;
  TORCH_CHECK(v.device() == out.device(), "ag_kernels::", op, ": ", name, " is on ", v.device(), " but out is on ",
              out.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == batch, "ag_kernels::", op, ": ", name,
              " must be 1-D with one value per sample (length ", batch, "), got shape ", v.sizes());
  c.ptr = v.data_ptr();
  c.stride = v.stride(0);
  c.type = d_type_of(op, name, v);
  return c;
}

}  // namespace

StepArgs make_step_args(
    const char* op, const at::Tensor& out, const at::Tensor* x, const char* x_name, const at::Tensor* x_euler,
    const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide, const std::optional<at::Tensor>& g_vec,
    const std::optional<at::Tensor>& s_vec, const std::optional<at::Tensor>& sn_vec, double g, double s, double sn,
    const Uncond& uncond) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, "ag_kernels::", op,
                   ": out must have dtype float32/float64, got ", out.scalar_type());
  TORCH_CHECK(out.is_non_overlapping_and_dense(), "ag_kernels::", op,
              ": out must be non-overlapping and dense, got strides ", out.strides(), " for shape ", out.sizes());
  StepArgs a;
  a.numel = out.numel();
  a.x_type = out.scalar_type();
  a.device = out.device();
  a.out = out.data_ptr();
  if (x != nullptr) {
    check_operand(op, x_name, *x, out);
    TORCH_CHECK_TYPE(x->scalar_type() == out.scalar_type(), "ag_kernels::", op, ": ", x_name,
                     " must have out's dtype ", out.scalar_type(), ", got ", x->scalar_type());
    a.x = x->data_ptr();
  }
  if (x_euler != nullptr) {
    check_operand(op, "x_euler", *x_euler, out);
    TORCH_CHECK_TYPE(x_euler->scalar_type() == out.scalar_type(), "ag_kernels::", op,
                     ": x_euler must have out's dtype ", out.scalar_type(), ", got ", x_euler->scalar_type());
    a.x_euler = x_euler->data_ptr();
  }
  check_operand(op, "d_main", d_main, out);
  a.d_main = d_main.data_ptr();
  a.d_main_type = d_type_of(op, "d_main", d_main);
  if (d_guide.has_value()) {
    check_operand(op, "d_guide", *d_guide, out);
    a.d_guide = d_guide->data_ptr();
    a.d_guide_type = d_type_of(op, "d_guide", *d_guide);
  }
  if (uncond.d_uncond.has_value()) {
    check_operand(op, "d_uncond", *uncond.d_uncond, out);
    a.d_uncond = uncond.d_uncond->data_ptr();
    a.d_uncond_type = d_type_of(op, "d_uncond", *uncond.d_uncond);
  }

  const int64_t batch = out.dim() > 0 ? out.size(0) : 1;
  a.coef.g = coefficient(op, "g_vec", g_vec, g, out, batch);
  a.coef.s = coefficient(op, "s_vec", s_vec, s, out, batch);
  a.coef.sn = coefficient(op, "sn_vec", sn_vec, sn, out, batch);
  a.coef.cfg = coefficient(op, "c_vec", uncond.c_vec, uncond.c, out, batch);
  a.rows = 1;
  a.row_numel = a.numel;
  if (a.coef.per_sample() && batch > 1 && a.numel > 0) {
    // Per-sample coefficients are looked up by memory position: each sample must be one contiguous run.
    TORCH_CHECK(out.stride(0) == a.numel / batch, "ag_kernels::", op,
                ": per-sample coefficients need the batch dimension outermost in memory (out.stride(0) == ",
                a.numel / batch, "), got strides ", out.strides());
    a.rows = batch;
    a.row_numel = a.numel / batch;
  }
  return a;
}

StepArgs make_multistep_args(const at::Tensor& out, const at::Tensor& history, const at::Tensor& x,
                             const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                             const std::optional<at::Tensor>& g_vec, double g, double a, double b0, double b1,
                             double b2, int64_t read1, int64_t read2, int64_t write,
                             const std::optional<at::Tensor>& corrected, double ac, double c0, double c1, double c2,
                             const Uncond& uncond) {
  const char* op = "multistep_step";
  StepArgs args = make_step_args(op, out, &x, "x", nullptr, d_main, d_guide, g_vec, std::nullopt, std::nullopt, g,
                                 1.0, 1.0, uncond);
  TORCH_CHECK(out.is_contiguous(), "ag_kernels::", op, ": out must be contiguous, got strides ", out.strides());
  TORCH_CHECK(history.device() == out.device(), "ag_kernels::", op, ": history is on ", history.device(),
              " but out is on ", out.device());
  TORCH_CHECK_TYPE(history.scalar_type() == out.scalar_type(), "ag_kernels::", op, ": history must have out's dtype ",
                   out.scalar_type(), ", got ", history.scalar_type());
  TORCH_CHECK(history.dim() == out.dim() + 1 && history.size(0) >= 1 && history.sizes().slice(1) == out.sizes(),
              "ag_kernels::", op, ": history must have shape (K, *out.shape) with K >= 1, got ", history.sizes());
  TORCH_CHECK(history.is_contiguous(), "ag_kernels::", op, ": history must be contiguous, got strides ",
              history.strides());
  // The op reads history slots while it writes out: a shared byte would be read after it was overwritten.
  TORCH_CHECK(out.numel() == 0 || at::get_overlap_status(out, history) == at::MemOverlapStatus::No, "ag_kernels::", op,
              ": out overlaps history; pass a separate tensor");
  const int64_t slots = history.size(0);
  const int64_t slot[3] = {read1, read2, write};
  const char* names[3] = {"read1", "read2", "write"};
  for (int k = 0; k < 3; ++k) {
    TORCH_CHECK(slot[k] >= -1 && slot[k] < slots, "ag_kernels::", op, ": ", names[k],
                " must be a history slot in [0, ", slots, ") or -1 (none), got ", slot[k]);
  }
  args.ms.a = a;
  args.ms.b0 = b0;
  args.ms.b1 = read1 >= 0 ? b1 : 0.0;
  args.ms.b2 = read2 >= 0 ? b2 : 0.0;
  args.ms.history = history.data_ptr();
  args.ms.read1 = read1;
  args.ms.read2 = read2;
  args.ms.write = write;
  if (corrected.has_value()) {
    const at::Tensor& xc = *corrected;
    TORCH_CHECK_TYPE(xc.scalar_type() == out.scalar_type(), "ag_kernels::", op, ": corrected must have out's dtype ",
                     out.scalar_type(), ", got ", xc.scalar_type());
    TORCH_CHECK(xc.device() == out.device() && xc.sizes() == out.sizes() && xc.is_contiguous(), "ag_kernels::", op,
                ": corrected must be contiguous with out's shape ", out.sizes(), " on ", out.device());
    // x_c is written where x is read (in place: the same elements) and nowhere another operand lives.
    if (xc.numel() > 0) {
      const bool is_x = xc.data_ptr() == x.data_ptr();
      for (const at::Tensor* t : {&out, &history, &x, &d_main}) {
        if (t == &x && is_x) continue;
        TORCH_CHECK(at::get_overlap_status(xc, *t) == at::MemOverlapStatus::No, "ag_kernels::", op,
                    ": corrected overlaps another operand; pass x itself or a separate tensor");
      }
      TORCH_CHECK(!d_guide.has_value() || at::get_overlap_status(xc, *d_guide) == at::MemOverlapStatus::No,
                  "ag_kernels::", op, ": corrected overlaps d_guide; pass x itself or a separate tensor");
      TORCH_CHECK(!uncond.d_uncond.has_value() ||
                      at::get_overlap_status(xc, *uncond.d_uncond) == at::MemOverlapStatus::No,
                  "ag_kernels::", op, ": corrected overlaps d_uncond; pass x itself or a separate tensor");
    }
    args.ms.corrected = xc.data_ptr();
    args.ms.ac = ac;
    args.ms.c0 = c0;
    args.ms.c1 = read1 >= 0 ? c1 : 0.0;
    args.ms.c2 = read2 >= 0 ? c2 : 0.0;
  }
  return args;
}

}  // namespace ag_kernels
