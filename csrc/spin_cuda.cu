// Occupies a CUDA stream for a modelled time: the simulated transport's
// stand-in for the wire, and the CUDA form of the scheduler's debug delay.
// One thread spinning on the global timer; it also polls an abort flag in
// mapped pinned memory, so Communicator::abort() ends it at once.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "communicator.h"

namespace zerocomm {
namespace {

__global__ void spin_kernel(unsigned long long ns, volatile int* abort) {
  unsigned long long start;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (;;) {
    unsigned long long now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start >= ns || (abort != nullptr && *abort != 0)) break;
    __nanosleep(1000);
  }
}

}  // namespace

void spin_current_stream(double seconds, volatile int* abort) {
  if (seconds <= 0) return;
  spin_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<unsigned long long>(seconds * 1e9), abort);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

volatile int* alloc_spin_flag() {
  // Mapped pinned memory: the host writes it, a running kernel sees it.
  // With unified addressing the host pointer is valid on the device too.
  int* p = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&p), sizeof(int),
                               cudaHostAllocMapped | cudaHostAllocPortable));
  *p = 0;
  return p;
}

}  // namespace zerocomm
