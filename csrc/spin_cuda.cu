// Occupies a CUDA stream for a modelled time: the simulated transport's
// stand-in for the wire. One thread spinning on the global timer.
#include <ATen/cuda/CUDAContext.h>

#include "communicator.h"

namespace zerocomm {
namespace {

__global__ void spin_kernel(unsigned long long ns) {
  unsigned long long start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start >= ns) break;
    __nanosleep(1000);
  }
}

}  // namespace

void spin_current_stream(double seconds) {
  if (seconds <= 0) return;
  spin_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<unsigned long long>(seconds * 1e9));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace zerocomm
