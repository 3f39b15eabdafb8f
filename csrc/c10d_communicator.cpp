#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <chrono>
#include <thread>

#include "communicator.h"

namespace zerocomm {
namespace {

class C10dCommunicator final : public Communicator {
 public:
  C10dCommunicator(c10::intrusive_ptr<c10d::Backend> pg,
                   int64_t timeout_ms)
      : pg_(std::move(pg)), timeout_(timeout_ms) {}

  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }
  std::string name() const override { return pg_->getBackendName(); }

  void broadcast(at::Tensor& t, int root) override {
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(pg_->broadcast(v, opts), "broadcast");
  }
  void all_gather(at::Tensor& flat) override {
    // gloo copies input into output slot by slot; a private copy of the
    // shard keeps the input from aliasing the output it is gathered into.
    auto shard = flat.chunk(size())[rank()].clone();
    wait(pg_->all_gather_single(flat, shard), "all_gather");
  }
  void reduce(at::Tensor& t, int root, bool average) override {
    std::vector<at::Tensor> v{t};
    c10d::ReduceOptions opts;
    opts.rootRank = root;
    wait(pg_->reduce(v, opts), "reduce");
    if (average && rank() == root) t.div_(size());
  }
  void reduce_scatter(at::Tensor& flat, at::Tensor& shard,
                      bool average) override {
    wait(pg_->reduce_scatter_single(shard, flat), "reduce_scatter");
    if (average) shard.div_(size());
  }
  void all_reduce(at::Tensor& t, bool average) override {
    std::vector<at::Tensor> v{t};
    wait(pg_->allreduce(v), "all_reduce");
    if (average) t.div_(size());
  }

 private:
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* op) {
    const bool ok = work->wait(timeout_);
    TORCH_CHECK(ok, "zerocomm: ", op, " on the ", name(), " group timed out "
                "after ", timeout_.count(), " ms");
  }
  c10::intrusive_ptr<c10d::Backend> pg_;
  std::chrono::milliseconds timeout_;
};

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
    if (!shard.is_same(flat)) shard.copy_(flat.narrow(0, 0, shard.numel()));
    occupy(flat, ring());
  }
  void all_reduce(at::Tensor& t, bool) override { occupy(t, 2.0 * ring()); }

 private:
  double ring() const { return double(world_ - 1) / world_; }
  void occupy(const at::Tensor& t, double factor) {
    const double seconds =
        latency_s_ + factor * t.numel() * t.element_size() / bytes_per_s_;
#ifdef ZEROCOMM_WITH_CUDA
    if (t.is_cuda()) {
      spin_current_stream(seconds);
      return;
    }
#endif
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  }
  double latency_s_, bytes_per_s_;
  int world_;
};

}  // namespace

std::shared_ptr<Communicator> make_c10d_communicator(
    const c10::intrusive_ptr<c10d::Backend>& pg, int64_t timeout_ms) {
  TORCH_CHECK_VALUE(pg, "process group is None");
  return std::make_shared<C10dCommunicator>(pg, timeout_ms);
}

std::shared_ptr<Communicator> make_simulated_communicator(
    double latency_us, double bandwidth_gbps, int modelled_world) {
  return std::make_shared<SimulatedCommunicator>(latency_us, bandwidth_gbps,
                                                 modelled_world);
}

#ifndef ZEROCOMM_WITH_CUDA
int nccl_version() { return 0; }
#endif

}  // namespace zerocomm
