// The Communicator base (abort flag, abortable holds) and the two CPU-side
// communicators: any c10d backend (gloo) and the simulated transport.
#include <chrono>
#include <map>
#include <thread>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "communicator.h"

namespace zerocomm {

AbortFlag::~AbortFlag() {
  // The pinned flag is deliberately never freed: a spin kernel may still
  // poll it, and cudaFreeHost would synchronize the device, which hangs
  // behind a stuck NCCL kernel. Setting it ends any spin still running.
  if (host_flag_ != nullptr) *host_flag_ = 1;
}

bool AbortFlag::set() {
  bool first;
  {
    std::lock_guard<std::mutex> lock(mu_);
    first = !set_.exchange(true);
    if (host_flag_ != nullptr) *host_flag_ = 1;
  }
  cv_.notify_all();
  return first;
}

bool AbortFlag::sleep_for(double seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::nanoseconds>(
                            std::chrono::duration<double>(seconds));
  std::unique_lock<std::mutex> lock(mu_);
  return !cv_.wait_until(lock, deadline, [this] { return is_set(); });
}

void AbortFlag::notify() {
  {
    std::lock_guard<std::mutex> lock(mu_);
  }  // no lost wake-up
  cv_.notify_all();
}

#ifdef ZEROCOMM_WITH_CUDA
volatile int* AbortFlag::device_flag() {
  std::lock_guard<std::mutex> lock(mu_);
  if (host_flag_ == nullptr) {
    host_flag_ = alloc_spin_flag();
    if (is_set()) *host_flag_ = 1;
  }
  return host_flag_;
}
#endif

void Communicator::throw_if_aborted(const char* op) const {
  TORCH_CHECK(!flag_->is_set(), "zerocomm: ", op, " on the ", name(),
              " communicator after it was aborted (a sync failed or timed "
              "out); close() this handle and attach again");
}

void Communicator::check_error() {
  throw_if_aborted("check_error");
  check_async_error();
}

void Communicator::abort() {
  if (flag_->set()) abort_transport();
}

void Communicator::hold(double seconds, bool cuda) {
  throw_if_aborted("a hold of the comm stream");
  if (seconds <= 0) return;
#ifdef ZEROCOMM_WITH_CUDA
  if (cuda) {
    spin_current_stream(seconds, flag_->device_flag());
    return;
  }
#endif
  TORCH_CHECK(!cuda, "zerocomm was built without CUDA");
  TORCH_CHECK(flag_->sleep_for(seconds), "zerocomm: the ", name(),
              " communicator was aborted while it held the comm stream");
}

namespace {

class C10dCommunicator final : public Communicator {
 public:
  C10dCommunicator(c10::intrusive_ptr<c10d::Backend> pg, int64_t timeout_ms)
      : pg_(std::move(pg)),
        timeout_(timeout_ms),
        gloo_(pg_->getBackendName() == "gloo") {}

  int rank() const override { return pg_->getRank(); }
  int size() const override { return pg_->getSize(); }
  std::string name() const override { return pg_->getBackendName(); }

  void broadcast(at::Tensor& t, int root) override {
    throw_if_aborted("broadcast");
    std::vector<at::Tensor> v{t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    wait(pg_->broadcast(v, opts), "broadcast");
  }
  void all_gather(at::Tensor& flat) override {
    throw_if_aborted("all_gather");
    const int64_t n = flat.numel() / size();
    if (gloo_ && size() <= kGlooBroadcastGatherMax) {
      // [Note: gloo all-gather] Each slice broadcast in place from its
      // owner: no copy of this rank's shard, and faster than gloo's
      // all-gather on 2 ranks (1 MiB: 0.9 against 1.6 ms wall; 3 MiB: 2.8
      // against 4.1 ms; benchmarks/collectives.py). On 4 ranks (4 processes
      // on this 2-core VM) two runs disagreed within noise (3 MiB: 7.0
      // against 8.1 ms, then 7.0 against 6.6), hence the cap.
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      for (int r = 0; r < size(); ++r) {
        std::vector<at::Tensor> v{flat.narrow(0, r * n, n)};
        c10d::BroadcastOptions opts;
        opts.rootRank = r;
        works.push_back(pg_->broadcast(v, opts));
      }
      for (auto& w : works) wait(w, "all_gather");
      return;
    }
    // gloo copies input into output slot by slot; a private copy of the
    // shard keeps the input from aliasing the output it is gathered into.
    auto shard = scratch(flat, n);
    shard.copy_(flat.narrow(0, rank() * n, n));
    wait(pg_->all_gather_single(flat, shard), "all_gather");
  }
  void reduce(at::Tensor& t, int root, bool average) override {
    throw_if_aborted("reduce");
    std::vector<at::Tensor> v{t};
    c10d::ReduceOptions opts;
    opts.rootRank = root;
    wait(pg_->reduce(v, opts), "reduce");
    if (average && rank() == root) t.div_(size());
  }
  void reduce_scatter(at::Tensor& flat, at::Tensor& shard,
                      bool average) override {
    throw_if_aborted("reduce_scatter");
    if (gloo_) {
      reduce_scatter_gloo(flat, shard, average);
      return;
    }
    wait(pg_->reduce_scatter_single(shard, flat), "reduce_scatter");
    if (average) shard.div_(size());
  }
  void all_reduce(at::Tensor& t, bool average) override {
    throw_if_aborted("all_reduce");
    std::vector<at::Tensor> v{t};
    wait(pg_->allreduce(v), "all_reduce");
    if (average) t.div_(size());
  }

 protected:
  void abort_transport() override {
    pg_->abort();  // a no-op for gloo today; the flag ends our own waits
  }

 private:
  // Waits for `work` on the flag's condition variable instead of inside
  // Work::wait, so abort() (the watchdog, close()) ends the wait now.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    auto done = std::make_shared<std::atomic<bool>>(false);
    try {
      // The callback may outlive this call and this communicator (after an
      // abort): it holds only shared state.
      work->getFuture()->addCallback(
          [done, flag = flag_](c10::ivalue::Future&) {
            done->store(true);
            flag->notify();
          });
    } catch (const c10::Error&) {
      // No future: the work runs inside Work::wait itself (gloo's
      // reduce_scatter_single does; zerocomm no longer calls it on gloo:
      // [Note: gloo reduce-scatter]), so that wait cannot be interrupted;
      // it is bounded by the timeout.
      const bool ok = work->wait(timeout_);
      TORCH_CHECK(ok, "zerocomm: ", op, " on the ", name(),
                  " group timed out after ", timeout_.count(), " ms");
      return;
    }
    while (!flag_->wait_until(deadline, [&] { return done->load(); })) {
      throw_if_aborted(op);
      TORCH_CHECK(std::chrono::steady_clock::now() < deadline, "zerocomm: ", op,
                  " on the ", name(), " group timed out after ",
                  timeout_.count(), " ms");
    }
    work->wait();  // complete: rethrows the backend's error, if any
  }
  // [Note: gloo reduce-scatter] gloo's reduce_scatter_single costs more
  // CPU than its own all-reduce of the whole buffer (2 ranks, 3 MiB: 5.7 ms
  // wall and 3.9 ms CPU, against 5.2 / 3.3; benchmarks/collectives.py,
  // benchmarks/results/cpu/collectives_cpu.json). Two ranks: each slice is
  // reduced onto its owner, the pairwise exchange a ring does for two (1 MiB:
  // 2.3 ms wall against 3.0; 3 MiB: 5.6 / 3.6). More ranks: the all-reduce,
  // then this rank's slice (4 ranks, 3 MiB: 10.6 / 4.8 against 10.8 / 4.8;
  // the rooted reduces take 14.8 there). `flat` is zerocomm's own bucket
  // ([Note: gradient ownership]), rewritten at every hand-over, so reducing
  // in place is safe.
  void reduce_scatter_gloo(at::Tensor& flat, at::Tensor& shard, bool average) {
    const int64_t n = shard.numel();
    auto mine = flat.narrow(0, static_cast<int64_t>(rank()) * n, n);
    if (size() == 2) {
      std::vector<c10::intrusive_ptr<c10d::Work>> works;
      for (int r = 0; r < 2; ++r) {
        std::vector<at::Tensor> v{flat.narrow(0, r * n, n)};
        c10d::ReduceOptions opts;
        opts.rootRank = r;
        works.push_back(pg_->reduce(v, opts));
      }
      for (auto& w : works) wait(w, "reduce_scatter");
    } else {
      std::vector<at::Tensor> v{flat};
      wait(pg_->allreduce(v), "reduce_scatter");
    }
    // The copy out and the mean in one pass.
    if (average)
      at::div_out(shard, mine, size());
    else
      shard.copy_(mine);
  }
  // The shard copy's buffer, one per dtype, kept across calls: a fresh
  // clone per bucket and step cost an mmap, page faults and zeroed pages.
  // Only the comm worker calls the collectives, so no lock.
  at::Tensor scratch(const at::Tensor& like, int64_t n) {
    auto& buf = scratch_[like.scalar_type()];
    if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, like.options());
    return buf.narrow(0, 0, n);
  }
  c10::intrusive_ptr<c10d::Backend> pg_;
  std::chrono::milliseconds timeout_;
  std::map<at::ScalarType, at::Tensor> scratch_;
  const bool gloo_;  // picks the reduce-scatter and the all-gather (the Notes)
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

std::shared_ptr<Communicator> make_c10d_communicator(
    const c10::intrusive_ptr<c10d::Backend>& pg, int64_t timeout_ms) {
  TORCH_CHECK_VALUE(pg, "process group is None");
  return std::make_shared<C10dCommunicator>(pg, timeout_ms);
}

std::shared_ptr<Communicator> make_simulated_communicator(double latency_us,
                                                          double bandwidth_gbps,
                                                          int modelled_world) {
  return std::make_shared<SimulatedCommunicator>(latency_us, bandwidth_gbps,
                                                 modelled_world);
}

#ifndef ZEROCOMM_WITH_CUDA
int nccl_version() { return 0; }
#endif

}  // namespace zerocomm
