// The CUDA kernels of guided_denoise (one translation unit per op: see steps_cuda.cuh).
#include "steps_cuda.cuh"

namespace ag_kernels {

template <>
void cuda_step<kDenoise>(const StepArgs& a) {
  run_step<kDenoise>(a);
}

}  // namespace ag_kernels
