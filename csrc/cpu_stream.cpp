#include <c10/util/Exception.h>

#include "stream.h"

namespace zerocomm {

void CpuEvent::complete(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    error_ = std::move(error);
    at_ = std::chrono::steady_clock::now();
  }
  cv_.notify_all();
}

bool CpuEvent::query() {
  std::lock_guard<std::mutex> lock(mu_);
  if (done_ && error_) std::rethrow_exception(error_);
  return done_;
}

void CpuEvent::synchronize(Millis timeout, const std::string& what) {
  std::unique_lock<std::mutex> lock(mu_);
  const bool ok = cv_.wait_for(lock, timeout, [this] { return done_; });
  TORCH_CHECK(ok, "zerocomm: timed out after ", timeout.count(),
              " ms waiting for ", what,
              " (a peer may have died or stalled; raise `timeout` if the "
              "job is just slow)");
  if (error_) std::rethrow_exception(error_);
}

double CpuEvent::elapsed_since(Event& earlier) {
  auto* e = dynamic_cast<CpuEvent*>(&earlier);
  TORCH_CHECK(e != nullptr, "elapsed_since needs two CPU events");
  return std::chrono::duration<double>(at_ - e->at_).count();
}

CpuStream::CpuStream() : worker_([this] { run(); }) {}

CpuStream::~CpuStream() { close(); }

void CpuStream::close() {
  std::lock_guard<std::mutex> closing(close_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  // Closed from its own worker (a task dropped the last reference): a join
  // would throw and terminate the process; the worker ends right after.
  if (worker_.get_id() == std::this_thread::get_id())
    worker_.detach();
  else if (worker_.joinable())
    worker_.join();
}

void CpuStream::push(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Nothing would ever run it: an event recorded now would never complete.
    TORCH_CHECK(!stop_, "zerocomm: this comm stream is closed");
    queue_.push_back(std::move(task));
  }
  cv_.notify_all();
}

void CpuStream::enqueue(std::function<void()> fn) {
  push({std::move(fn), false});
}

void CpuStream::run() {
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    if (error_ && !task.always) continue;  // poisoned: skip work
    try {
      task.fn();
    } catch (...) {
      error_ = std::current_exception();
    }
  }
}

std::shared_ptr<Event> CpuStream::record() {
  auto event = std::make_shared<CpuEvent>();
  // Runs on the worker, the only thread that touches error_.
  push({[this, event] { event->complete(error_); }, true});
  return event;
}

void CpuStream::wait(std::shared_ptr<Event> event, Millis timeout,
                     const std::string& what) {
  enqueue([event, timeout, what] { event->synchronize(timeout, what); });
}

std::shared_ptr<Event> CpuStream::record_current() {
  auto event = std::make_shared<CpuEvent>();
  event->complete();
  return event;
}

#ifndef ZEROCOMM_WITH_CUDA
std::shared_ptr<Stream> make_stream(int cuda_device, bool /*high_priority*/) {
  TORCH_CHECK_VALUE(cuda_device < 0,
                    "zerocomm was built without CUDA; rebuild with a CUDA "
                    "toolkit (CUDA_HOME) to use a CUDA stream");
  return std::make_shared<CpuStream>();
}
#endif

}  // namespace zerocomm
