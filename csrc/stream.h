// The one stream/event interface the scheduler talks to. Two implementations:
// a CUDA stream + CUDA event (cuda_stream.cpp, the only file that knows about
// CUDA streams and events) and a CPU "stream": a worker thread that runs
// queued tasks in order, with completion events (cpu_stream.cpp).
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace at {
class Tensor;
}

namespace zerocomm {

using Millis = std::chrono::milliseconds;

class Event {
 public:
  virtual ~Event() = default;
  // True once all work recorded before this event has finished (rethrows the
  // error of a failed task).
  virtual bool query() = 0;
  // Host blocks until the event completes; throws the failed task's error,
  // or a timeout error naming `what` after `timeout`.
  virtual void synchronize(Millis timeout, const std::string& what) = 0;
  // The caller's compute stream waits for this event. CUDA: the current CUDA
  // stream waits on the GPU (no host block). CPU: the host is the compute
  // stream, so this is synchronize().
  virtual void block_current(Millis timeout, const std::string& what) = 0;
  // Seconds from `earlier` to this event (both completed, same kind).
  virtual double elapsed_since(Event& earlier) = 0;
};

class Stream {
 public:
  virtual ~Stream() = default;
  // Run `fn` in stream order. CPU: on the worker thread. CUDA: now, on the
  // calling thread, with this stream current, so its kernels queue here.
  virtual void enqueue(std::function<void()> fn) = 0;
  // An event that completes when everything enqueued so far has completed.
  virtual std::shared_ptr<Event> record() = 0;
  // Work enqueued after this call starts after `event` completes; the host
  // is never blocked (CPU: the worker waits, CUDA: cudaStreamWaitEvent).
  virtual void wait(std::shared_ptr<Event> event, Millis timeout,
                    const std::string& what) = 0;
  // An event marking "now" on the caller's compute stream (CUDA: recorded on
  // the current stream; CPU: already complete, the host is in order).
  virtual std::shared_ptr<Event> record_current() = 0;
  // `t` was made on the compute stream and is read by work on this stream:
  // keep its memory from being reused until that work is done (CUDA: the
  // caching allocator's record_stream; CPU: the task's closure holds it).
  virtual void keep_alive(const at::Tensor& t) = 0;
  virtual bool is_cuda() const = 0;
  // Whether events recorded from now on can be timed (elapsed_since). CUDA
  // events without timing are cheaper; tracing turns it on.
  virtual void set_timing(bool) {}
  // Whether the caller's compute stream is being captured into a CUDA graph
  // (CPU: never).
  virtual bool capturing() const { return false; }
  // Stops the stream's own thread, if it has one, once the queued work has
  // run (CPU: drains and joins the worker; later enqueues throw). Idempotent.
  // CUDA: nothing to stop.
  virtual void close() {}
};

// A CPU completion flag. Completed by the worker, possibly with an error.
class CpuEvent final : public Event {
 public:
  void complete(std::exception_ptr error = nullptr);
  bool query() override;
  void synchronize(Millis timeout, const std::string& what) override;
  void block_current(Millis timeout, const std::string& what) override {
    synchronize(timeout, what);
  }
  double elapsed_since(Event& earlier) override;
  std::chrono::steady_clock::time_point completed_at() const { return at_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  std::chrono::steady_clock::time_point at_;
};

class CpuStream final : public Stream {
 public:
  CpuStream();
  ~CpuStream() override;  // close()
  CpuStream(const CpuStream&) = delete;
  CpuStream& operator=(const CpuStream&) = delete;

  void enqueue(std::function<void()> fn) override;
  std::shared_ptr<Event> record() override;
  void wait(std::shared_ptr<Event> event, Millis timeout,
            const std::string& what) override;
  std::shared_ptr<Event> record_current() override;
  void keep_alive(const at::Tensor&) override {}
  bool is_cuda() const override { return false; }
  void close() override;

 private:
  // A task that throws poisons the stream: later tasks are skipped and later
  // events complete with the same error, as a failed CUDA stream would.
  void run();
  std::mutex mu_;
  std::condition_variable cv_;
  struct Task {
    std::function<void()> fn;
    bool always;  // event completions run even on a poisoned stream
  };
  void push(Task task);
  std::deque<Task> queue_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::mutex close_mu_;  // close() from two threads: one joins, one waits
  std::thread worker_;
};

// Stream factory: CUDA when `cuda_device >= 0` (requires a CUDA build).
std::shared_ptr<Stream> make_stream(int cuda_device, bool high_priority);

}  // namespace zerocomm
