// Collectives the scheduler issues, behind one interface. Every call runs on
// the comm stream (inside Stream::enqueue): NCCL queues on the current CUDA
// stream, c10d (gloo) blocks the CPU worker thread until done.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace c10d {
class Backend;
}

namespace zerocomm {

// Set once, by Communicator::abort(). Everything that may block the comm
// stream for long (a host sleep, a spin kernel, a wait for a c10d work)
// watches it, so an abort ends it now instead of after the modelled time or
// the peer's timeout.
class AbortFlag {
 public:
  AbortFlag() = default;
  ~AbortFlag();
  AbortFlag(const AbortFlag&) = delete;
  AbortFlag& operator=(const AbortFlag&) = delete;
  bool set();  // true for the call that set it
  bool is_set() const { return set_.load(); }
  // Host sleep; false when the flag was set before `seconds` passed.
  bool sleep_for(double seconds);
  // Blocks until `done()` is true, the flag is set or `deadline` passes;
  // returns done(). `done` is re-checked after every notify().
  template <class Pred>
  bool wait_until(std::chrono::steady_clock::time_point deadline, Pred done) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_until(lock, deadline, [&] { return is_set() || done(); });
    return done();
  }
  void notify();  // wakes wait_until to re-check its predicate
#ifdef ZEROCOMM_WITH_CUDA
  // A mapped pinned int the spin kernel polls (allocated on first use).
  volatile int* device_flag();
#endif

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> set_{false};
  volatile int* host_flag_ = nullptr;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;
  // Every collective throws "aborted" once abort() was called.
  virtual void broadcast(at::Tensor& t, int root) = 0;
  // In place: this rank's shard is flat.chunk(size())[rank()].
  virtual void all_gather(at::Tensor& flat) = 0;
  virtual void reduce(at::Tensor& t, int root, bool average) = 0;
  virtual void reduce_scatter(at::Tensor& flat, at::Tensor& shard,
                              bool average) = 0;
  virtual void all_reduce(at::Tensor& t, bool average) = 0;
  // Fuse the collectives issued in between into one launch (NCCL groups).
  virtual void group_start() {}
  virtual void group_end() {}
  // One tiny collective right after init, from the thread that attached, so
  // that connections are not set up lazily from the autograd thread (NCCL).
  // Runs on the comm stream.
  virtual void warm_up() {}
  // Throws "aborted" after abort(), or the transport's asynchronous error
  // (NCCL); thread-safe, called by the watchdog while collectives run.
  void check_error();
  // Tear down without waiting for peers: in-flight collectives, holds and
  // spin kernels end now, and every later call throws. Thread-safe,
  // idempotent.
  void abort();
  bool aborted() const { return flag_->is_set(); }
  // Frees the transport now, on the calling thread (gloo: the backend and
  // its threads: [Note: native teardown without the GIL]); every later call
  // throws. Only once nothing issues collectives on it any more (its comm
  // stream closed). Idempotent.
  void close();
  // Occupies the comm stream for `seconds` (debug delays, the simulated
  // wire); ends early, with an "aborted" error, on abort(). CUDA: a spin
  // kernel on the current stream; CPU: a sleep on this thread.
  void hold(double seconds, bool cuda);

 protected:
  virtual void check_async_error() {}
  virtual void abort_transport() {}
  virtual void release_transport() {}
  void throw_if_aborted(const char* op) const;
  // Shared: a c10d work's completion callback may outlive the communicator.
  std::shared_ptr<AbortFlag> flag_ = std::make_shared<AbortFlag>();

 private:
  std::atomic<bool> closed_{false};
};

// gloo (or any c10d backend) through torch's C++ API; `timeout_ms` bounds
// every wait.
std::shared_ptr<Communicator> make_c10d_communicator(
    const c10::intrusive_ptr<c10d::Backend>& pg, int64_t timeout_ms);
// Up to this many ranks, its gloo all-gather is W in-place broadcasts
// ([Note: gloo all-gather]; launches grow with W; measured up to 4 ranks).
// Exported to Python: benchmarks/scale_model.py models the same collective.
constexpr int kGlooBroadcastGatherMax = 4;

// Does the data movement of a world-size-1 group, then occupies the stream
// for the modelled time: latency + bytes_on_wire / bandwidth, where
// bytes_on_wire follows a ring of `modelled_world` ranks and each tensor
// stands for 1/shard_of of its bytes ([Note: simulated cost]).
std::shared_ptr<Communicator> make_simulated_communicator(double latency_us,
                                                          double bandwidth_gbps,
                                                          int modelled_world,
                                                          int shard_of = 1);
// What a simulated communicator charged so far: collectives, modelled
// seconds the comm stream was occupied, bytes a modelled rank sent.
struct SimulatedCharges {
  int64_t collectives;
  double seconds;
  double wire_bytes;
};
// ValueError when `comm` is not a simulated communicator.
SimulatedCharges simulated_charges(const std::shared_ptr<Communicator>& comm);

#ifdef ZEROCOMM_WITH_CUDA
std::string nccl_unique_id();
// Non-blocking ([Note: NCCL non-blocking communicator]): init and every
// call return at once; a call still in progress after `timeout_ms` aborts it.
std::shared_ptr<Communicator> make_nccl_communicator(const std::string& id,
                                                     int rank, int size,
                                                     int device,
                                                     int64_t timeout_ms);
// Spins the current CUDA stream for `seconds` (simulated transport, debug
// delays), or until `*abort` becomes non-zero.
void spin_current_stream(double seconds, volatile int* abort);
volatile int* alloc_spin_flag();
#endif
int nccl_version();  // 0 when built without CUDA

}  // namespace zerocomm
