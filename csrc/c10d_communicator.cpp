// The c10d communicator: any c10d backend (gloo) through torch's C++ API.
#include <chrono>
#include <map>
#include <mutex>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "communicator.h"
#include "torch_compat.h"

namespace zerocomm {

namespace {

class C10dCommunicator final : public Communicator {
 public:
  C10dCommunicator(c10::intrusive_ptr<c10d::Backend> pg, int64_t timeout_ms)
      : pg_(std::move(pg)),
        timeout_(timeout_ms),
        rank_(pg_->getRank()),
        size_(pg_->getSize()),
        name_(pg_->getBackendName()),
        gloo_(name_ == "gloo") {}

  // Cached: still answered after close() freed the backend.
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }

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
    wait(compat::all_gather_single(*pg_, flat, shard), "all_gather");
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
    wait(compat::reduce_scatter_single(*pg_, shard, flat), "reduce_scatter");
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
    std::lock_guard<std::mutex> lock(pg_mu_);
    if (pg_) pg_->abort();  // a no-op for gloo today; the flag ends our waits
  }
  // The last reference to the backend, normally: ProcessGroupGloo's
  // destructor waits for its queued work and joins its threads, here.
  void release_transport() override {
    c10::intrusive_ptr<c10d::Backend> pg;
    {
      std::lock_guard<std::mutex> lock(pg_mu_);
      pg = std::move(pg_);
    }
    scratch_.clear();
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
  // Collectives read pg_ unlocked: only the comm worker issues them, and it
  // has stopped before close(). The lock orders abort() against close().
  c10::intrusive_ptr<c10d::Backend> pg_;
  std::mutex pg_mu_;
  std::chrono::milliseconds timeout_;
  std::map<at::ScalarType, at::Tensor> scratch_;
  const int rank_, size_;
  const std::string name_;
  const bool gloo_;  // picks the reduce-scatter and the all-gather (the Notes)
};

}  // namespace

std::shared_ptr<Communicator> make_c10d_communicator(
    const c10::intrusive_ptr<c10d::Backend>& pg, int64_t timeout_ms) {
  TORCH_CHECK_VALUE(pg, "process group is None");
  return std::make_shared<C10dCommunicator>(pg, timeout_ms);
}

}  // namespace zerocomm
