// Registers the CUDA implementations of the guided-step ops (each op's kernels live in its own
// <op>_cuda.cu; see steps_cuda.cuh).
#include <torch/library.h>

#include "../ops.h"
#include "steps_cuda.cuh"

namespace ag_kernels {
namespace {

struct Cuda {
  template <int OP>
  static void run(const StepArgs& a) {
    cuda_step<OP>(a);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(ag_kernels, CUDA, m) { AG_KERNELS_REGISTER_STEP_OPS(m, Cuda); }

}  // namespace ag_kernels
