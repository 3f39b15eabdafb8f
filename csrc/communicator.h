// Collectives the scheduler issues, behind one interface. Every call runs on
// the comm stream (inside Stream::enqueue): NCCL queues on the current CUDA
// stream, c10d (gloo) blocks the CPU worker thread until done.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include <c10/util/intrusive_ptr.h>

namespace c10d {
class Backend;
}

namespace zerocomm {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;
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
  // Throws if the transport has failed asynchronously (NCCL async errors).
  virtual void check_error() {}
  // Tear down without waiting for peers (after an error or a timeout).
  virtual void abort() {}
};

// gloo (or any c10d backend) through torch's C++ API; `timeout_ms` bounds
// every wait.
std::shared_ptr<Communicator> make_c10d_communicator(
    const c10::intrusive_ptr<c10d::Backend>& pg, int64_t timeout_ms);

// Does the data movement of a world-size-1 group, then occupies the stream
// for the modelled time: latency + bytes_on_wire / bandwidth, where
// bytes_on_wire follows a ring of `modelled_world` ranks.
std::shared_ptr<Communicator> make_simulated_communicator(
    double latency_us, double bandwidth_gbps, int modelled_world);

#ifdef ZEROCOMM_WITH_CUDA
std::string nccl_unique_id();
std::shared_ptr<Communicator> make_nccl_communicator(const std::string& id,
                                                     int rank, int size,
                                                     int device);
// Spins the current CUDA stream for `seconds` (simulated transport).
void spin_current_stream(double seconds);
#endif
int nccl_version();  // 0 when built without CUDA

}  // namespace zerocomm
