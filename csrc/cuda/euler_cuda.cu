// The CUDA kernels of euler_step (one translation unit per op: see steps_cuda.cuh).
#include "steps_cuda.cuh"

namespace ag_kernels {

template <>
void cuda_step<kEuler>(const StepArgs& a) {
  run_step<kEuler>(a);
}

}  // namespace ag_kernels
