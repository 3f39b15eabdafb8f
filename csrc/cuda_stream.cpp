// The only place that knows about CUDA streams and events.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <thread>

#include "stream.h"

namespace zerocomm {
namespace {

class CudaEvent final : public Event {
 public:
  // Timing only while tracing: an event without it is cheaper to record
  // and to wait on (telemetry reads elapsed times only then).
  CudaEvent(const c10::cuda::CUDAStream& stream, bool timing)
      : event_(timing ? cudaEventDefault : cudaEventDisableTiming) {
    event_.record(stream);
  }
  bool query() override {
    // Also called from the watchdog thread: make the event's device current
    // there, or the runtime would create a context on device 0 for it.
    const c10::cuda::CUDAGuard guard(event_.device_index());
    return event_.query();
  }
  void synchronize(Millis timeout, const std::string& what) override {
    // Poll instead of cudaEventSynchronize so a stalled peer becomes an
    // error after `timeout` instead of a hang.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!event_.query()) {
      TORCH_CHECK(std::chrono::steady_clock::now() < deadline,
                  "zerocomm: timed out after ", timeout.count(),
                  " ms waiting for ", what,
                  " (a peer may have died or stalled)");
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  // GPU-side: the host is not blocked and the timeout cannot apply here;
  // the scheduler's watchdog bounds it by aborting the communicator, which
  // ends the kernels this wait is queued behind.
  void block_current(Millis, const std::string&) override {
    event_.block(c10::cuda::getCurrentCUDAStream(event_.device_index()));
  }
  double elapsed_since(Event& earlier) override {
    auto* e = dynamic_cast<CudaEvent*>(&earlier);
    TORCH_CHECK(e != nullptr, "elapsed_since needs two CUDA events");
    return e->event_.elapsed_time(event_) / 1e3;
  }
  void block(const c10::cuda::CUDAStream& stream) { event_.block(stream); }

 private:
  at::cuda::CUDAEvent event_;
};

class CudaStream final : public Stream {
 public:
  CudaStream(int device, bool high_priority)
      : stream_(create(device, high_priority)) {}

  void enqueue(std::function<void()> fn) override {
    const c10::cuda::CUDAStreamGuard guard(stream_);
    fn();
  }
  std::shared_ptr<Event> record() override {
    return std::make_shared<CudaEvent>(stream_, timing_.load());
  }
  void wait(std::shared_ptr<Event> event, Millis timeout,
            const std::string& what) override {
    if (auto* e = dynamic_cast<CudaEvent*>(event.get())) {
      e->block(stream_);
    } else {
      event->synchronize(timeout, what);  // a CPU event: the host orders it
    }
  }
  std::shared_ptr<Event> record_current() override {
    return std::make_shared<CudaEvent>(
        c10::cuda::getCurrentCUDAStream(stream_.device_index()),
        timing_.load());
  }
  void keep_alive(const at::Tensor& t) override {
    if (t.is_cuda()) t.record_stream(stream_);
  }
  bool is_cuda() const override { return true; }
  void set_timing(bool on) override { timing_ = on; }
  bool capturing() const override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaError_t err = cudaStreamIsCapturing(
        c10::cuda::getCurrentCUDAStream(stream_.device_index()).stream(),
        &status);
    if (err == cudaErrorStreamCaptureImplicit) {
      // The legacy default stream while another stream captures in global
      // mode: a capture is under way all the same.
      (void)cudaGetLastError();
      return true;
    }
    C10_CUDA_CHECK(err);
    return status != cudaStreamCaptureStatusNone;
  }

 private:
  // zerocomm's own stream, not one of torch's pool: pool streams are handed
  // round-robin to anyone who asks, so user work could queue behind (or
  // in between) the syncs. Never destroyed: the caching allocator may still
  // record events on it for tensors kept alive with record_stream.
  static c10::cuda::CUDAStream create(int device, bool high_priority) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    int least = 0, greatest = 0;
    C10_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t s = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithPriority(
        &s, cudaStreamNonBlocking, high_priority ? greatest : least));
    return c10::cuda::getStreamFromExternal(
        s, static_cast<c10::DeviceIndex>(device));
  }
  c10::cuda::CUDAStream stream_;
  std::atomic<bool> timing_{false};
};

}  // namespace

std::shared_ptr<Stream> make_stream(int cuda_device, bool high_priority) {
  if (cuda_device < 0) return std::make_shared<CpuStream>();
  return std::make_shared<CudaStream>(cuda_device, high_priority);
}

}  // namespace zerocomm
