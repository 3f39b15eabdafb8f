// The simulated transport: a world-size-1 group that occupies the comm
// stream for the time a ring of `modelled_world` ranks would take.
#include <c10/util/Exception.h>

#include "communicator.h"

namespace zerocomm {
namespace {

class SimulatedCommunicator final : public Communicator {
 public:
  SimulatedCommunicator(double latency_us, double bandwidth_gbps, int world)
      : latency_s_(latency_us * 1e-6),
        bytes_per_s_(bandwidth_gbps * 1e9),
        world_(world) {
    TORCH_CHECK_VALUE(latency_us >= 0 && bandwidth_gbps > 0 && world >= 1,
                      "simulated transport needs latency_us >= 0, "
                      "bandwidth_gbps > 0 and modelled world >= 1");
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
    if (!shard.is_same(flat)) shard.copy_(flat.narrow(0, 0, shard.numel()));
    occupy(flat, ring());
  }
  void all_reduce(at::Tensor& t, bool) override { occupy(t, 2.0 * ring()); }

 private:
  double ring() const { return double(world_ - 1) / world_; }
  void occupy(const at::Tensor& t, double factor) {
    hold(latency_s_ + factor * t.numel() * t.element_size() / bytes_per_s_,
         t.is_cuda());
  }
  double latency_s_, bytes_per_s_;
  int world_;
};

}  // namespace

std::shared_ptr<Communicator> make_simulated_communicator(double latency_us,
                                                          double bandwidth_gbps,
                                                          int modelled_world) {
  return std::make_shared<SimulatedCommunicator>(latency_us, bandwidth_gbps,
                                                 modelled_world);
}

}  // namespace zerocomm
