// The watchdog: one thread per scheduler that turns a stalled or failed
// collective into an aborted communicator and a stored error, so that no
// wait -- in particular a GPU-side one that the host never sees -- outlives
// the timeout. Written against Stream/Event, so the CPU path runs the same
// code as the CUDA one and CPU tests cover it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "communicator.h"
#include "stream.h"

namespace zerocomm {

class Watchdog {
 public:
  // `comms`: every communicator the watched work uses (the shard group's
  // and, hierarchical, the replicas'); a failure aborts all of them.
  Watchdog(std::vector<std::shared_ptr<Communicator>> comms, Millis timeout,
           Millis poll = Millis(100));
  ~Watchdog();  // stop()
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Watch the work `what` on the comm stream: `begin` was recorded right
  // before it (after any wait of the comm stream on the compute stream),
  // `end` right after it. [Note: watchdog timing] Events of one stream
  // complete in order, so only the oldest entry is timed, and only from when
  // the watchdog first sees its `begin` complete, i.e. from when the work
  // actually starts on the comm stream: a host that runs ahead of the GPU
  // (the comm stream still waiting for the compute stream) is never timed.
  // A null `begin` times from when the entry becomes the oldest.
  void track(std::shared_ptr<Event> begin, std::shared_ptr<Event> end,
             std::string what);
  // Rethrows the error that made the watchdog abort the communicator.
  void rethrow_if_failed();
  bool failed();
  // Stops and joins the thread (never leaves it joinable); idempotent, called
  // by the owner only. Entries still tracked are no longer timed.
  void stop();

 private:
  void run();
  struct Entry {
    std::shared_ptr<Event> begin, end;
    std::string what;
    bool started = false;  // `begin` seen complete; timed from `since`
    std::chrono::steady_clock::time_point since;
  };
  std::vector<std::shared_ptr<Communicator>> comms_;
  const Millis timeout_, poll_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Entry> pending_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace zerocomm
