// The simulated transport: a world-size-1 group that occupies the comm
// stream for the time a ring of `modelled_world` ranks would take.
//
// [Note: simulated cost] One collective costs latency + factor * bytes /
// bandwidth, where `latency` is the whole collective's (not a ring step's)
// and factor is what a rank of a ring of W ranks sends: (W-1)/W of the buffer
// for an all-gather or reduce-scatter, 2 (W-1)/W for an all-reduce, the whole
// buffer for a broadcast or reduce (pipelined). The two-tier layout (issue 21)
// uses two of them: the shard tier (intra-node, W = L) and the replica tier
// (inter-node, W = M replicas), whose tensor is the process's whole gradient
// bucket where a rank of the modelled cluster all-reduces only its 1/L shard:
// `shard_of` = L scales its bytes. Every charge is tallied, so tests assert
// the modelled cost instead of wall-clock time
// (benchmarks/scale_model.py models the same costs).
#include <c10/util/Exception.h>

#include <atomic>

#include "communicator.h"

namespace zerocomm {
namespace {

class SimulatedCommunicator final : public Communicator {
 public:
  SimulatedCommunicator(double latency_us, double bandwidth_gbps, int world,
                        int shard_of)
      : latency_s_(latency_us * 1e-6),
        bytes_per_s_(bandwidth_gbps * 1e9),
        world_(world),
        shard_of_(shard_of) {
    TORCH_CHECK_VALUE(
        latency_us >= 0 && bandwidth_gbps > 0 && world >= 1 && shard_of >= 1,
        "simulated transport needs latency_us >= 0, "
        "bandwidth_gbps > 0, modelled world >= 1 and "
        "shard_of >= 1 (got latency_us=",
        latency_us, ", bandwidth_gbps=", bandwidth_gbps,
        ", modelled world=", world, ", shard_of=", shard_of, ")");
  }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string name() const override { return "simulated"; }

  // A world-size-1 group moves no bytes between ranks; the time a ring of
  // world_ ranks would take is what the stream is occupied for.
  void broadcast(at::Tensor& t, int) override { occupy(t, 1.0); }
  void all_gather(at::Tensor& flat) override { occupy(flat, ring()); }
  void reduce(at::Tensor& t, int, bool) override { occupy(t, 1.0); }
  void reduce_scatter(at::Tensor& flat, at::Tensor& shard, bool) override {
    throw_if_aborted("reduce_scatter");
    // World size 1: the shard is the whole buffer; when it is a view of it
    // already (in place), the copy would be onto itself: skipped.
    if (shard.data_ptr() != flat.data_ptr() ||
        shard.scalar_type() != flat.scalar_type())
      shard.copy_(flat.narrow(0, 0, shard.numel()));
    occupy(flat, ring());
  }
  void all_reduce(at::Tensor& t, bool) override { occupy(t, 2.0 * ring()); }

  SimulatedCharges charges() const {
    return {collectives_.load(), seconds_.load(), wire_bytes_.load()};
  }

 private:
  double ring() const { return double(world_ - 1) / world_; }
  void occupy(const at::Tensor& t, double factor) {
    const double wire = factor * double(t.numel()) * t.element_size() /
                        shard_of_;  // bytes a modelled rank sends
    const double seconds = latency_s_ + wire / bytes_per_s_;
    hold(seconds, t.is_cuda());
    // Only the comm worker writes: load + store is enough.
    collectives_.store(collectives_.load() + 1);
    seconds_.store(seconds_.load() + seconds);
    wire_bytes_.store(wire_bytes_.load() + wire);
  }
  double latency_s_, bytes_per_s_;
  int world_, shard_of_;
  std::atomic<int64_t> collectives_{0};
  std::atomic<double> seconds_{0.0}, wire_bytes_{0.0};
};

}  // namespace

std::shared_ptr<Communicator> make_simulated_communicator(double latency_us,
                                                          double bandwidth_gbps,
                                                          int modelled_world,
                                                          int shard_of) {
  return std::make_shared<SimulatedCommunicator>(latency_us, bandwidth_gbps,
                                                 modelled_world, shard_of);
}

SimulatedCharges simulated_charges(const std::shared_ptr<Communicator>& comm) {
  auto sim = std::dynamic_pointer_cast<SimulatedCommunicator>(comm);
  TORCH_CHECK_VALUE(sim != nullptr, "simulated_charges: the ",
                    comm ? comm->name() : std::string("null"),
                    " communicator is not a simulated one");
  return sim->charges();
}

}  // namespace zerocomm
