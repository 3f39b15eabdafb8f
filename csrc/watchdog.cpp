#include "watchdog.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace zerocomm {

Watchdog::Watchdog(std::vector<std::shared_ptr<Communicator>> comms,
                   Millis timeout, Millis poll)
    : comms_(std::move(comms)),
      timeout_(timeout),
      poll_(poll),
      thread_([this] { run(); }) {}

Watchdog::~Watchdog() { stop(); }

void Watchdog::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  // Destroyed from its own thread (the last reference dropped there): a
  // join would throw and terminate; the thread exits right after this.
  if (thread_.get_id() == std::this_thread::get_id())
    thread_.detach();
  else if (thread_.joinable())
    thread_.join();
}

void Watchdog::track(std::shared_ptr<Event> begin, std::shared_ptr<Event> end,
                     std::string what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) return;  // already aborted: nothing more to time
  pending_.push_back({std::move(begin), std::move(end), std::move(what)});
}

void Watchdog::rethrow_if_failed() {
  std::lock_guard<std::mutex> lock(mu_);
  if (error_) std::rethrow_exception(error_);
}

bool Watchdog::failed() {
  std::lock_guard<std::mutex> lock(mu_);
  return error_ != nullptr;
}

void Watchdog::run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, poll_, [this] { return stop_; });
    if (stop_ || error_) continue;
    std::exception_ptr error;
    try {
      // Query outside the lock: a CUDA query must not stall track(). Only
      // this thread removes entries, and a deque keeps references to its
      // elements valid across push_back, so `front` stays the front.
      while (!pending_.empty()) {
        Entry& front = pending_.front();
        const auto begin = front.begin;
        const auto end = front.end;
        const bool started = front.started;
        lock.unlock();
        const bool done = end->query();  // rethrows a failed task
        const bool begun = done || started || !begin || begin->query();
        lock.lock();
        const auto now = std::chrono::steady_clock::now();
        if (done) {
          pending_.pop_front();
          continue;
        }
        if (begun && !front.started) {
          front.started = true;
          front.since = now;  // at most one poll after the work began
        }
        break;
      }
      const auto now = std::chrono::steady_clock::now();
      if (!pending_.empty() && pending_.front().started) {
        const Entry& front = pending_.front();
        TORCH_CHECK(now - front.since <= timeout_, "zerocomm: timed out after ",
                    timeout_.count(), " ms waiting for ", front.what,
                    " (watchdog: a peer may have died or stalled; the "
                    "communicator was aborted -- close() this handle; raise "
                    "`timeout` if the job is just slow)");
      }
      lock.unlock();
      for (const auto& c : comms_) c->check_error();  // NCCL's async errors
      lock.lock();
    } catch (...) {
      if (!lock.owns_lock()) lock.lock();
      error = std::current_exception();
    }
    if (!error) continue;
    // Stored before the abort: whoever wakes from the aborted work sees the
    // cause, not just "aborted".
    error_ = error;
    pending_.clear();
    lock.unlock();
    for (const auto& c : comms_) c->abort();  // kernels exit, waits return
    lock.lock();
  }
}

}  // namespace zerocomm
