// The CUDA kernels of heun_step (one translation unit per op: see steps_cuda.cuh).
#include "steps_cuda.cuh"

namespace ag_kernels {

template <>
void cuda_step<kHeun>(const StepArgs& a) {
  run_step<kHeun>(a);
}

}  // namespace ag_kernels
