// The only place that knows about CUDA streams and events.
#include "stream.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace zerocomm {
namespace {

class CudaEvent final : public Event {
 public:
  explicit CudaEvent(const c10::cuda::CUDAStream& stream)
      : event_(cudaEventDefault) {  // timing on: telemetry reads elapsed
    event_.record(stream);
  }
  bool query() override { return event_.query(); }
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
      : stream_(c10::cuda::getStreamFromPool(high_priority, device)) {}

  void enqueue(std::function<void()> fn) override {
    const c10::cuda::CUDAStreamGuard guard(stream_);
    fn();
  }
  std::shared_ptr<Event> record() override {
    return std::make_shared<CudaEvent>(stream_);
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
        c10::cuda::getCurrentCUDAStream(stream_.device_index()));
  }
  void keep_alive(const at::Tensor& t) override {
    if (t.is_cuda()) t.record_stream(stream_);
  }
  bool is_cuda() const override { return true; }

 private:
  c10::cuda::CUDAStream stream_;
};

}  // namespace

std::shared_ptr<Stream> make_stream(int cuda_device, bool high_priority) {
  if (cuda_device < 0) return std::make_shared<CpuStream>();
  return std::make_shared<CudaStream>(cuda_device, high_priority);
}

}  // namespace zerocomm
