// The CUDA kernels of guided_score (one translation unit per op: see steps_cuda.cuh).
#include "steps_cuda.cuh"

namespace ag_kernels {

template <>
void cuda_step<kScore>(const StepArgs& a) {
  run_step<kScore>(a);
}

}  // namespace ag_kernels
