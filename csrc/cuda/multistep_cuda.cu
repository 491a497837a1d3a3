// The CUDA kernels of multistep_step (one translation unit per op: see steps_cuda.cuh).
#include "steps_cuda.cuh"

namespace ag_kernels {

template <>
void cuda_step<kMultistep>(const StepArgs& a) {
  run_step<kMultistep>(a);
}

}  // namespace ag_kernels
