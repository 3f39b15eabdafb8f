// zerocomm's own NCCL communicator: created from a unique id that Python
// exchanges once over the user's process group, so it works wherever
// torch.distributed does (torchrun, Slurm, multi-node).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include "communicator.h"

namespace zerocomm {
namespace {

// A call that failed outright. ncclInProgress is not success: with a
// non-blocking communicator it means "started, poll the communicator"
// (NcclCommunicator::settle), so it passes here and is settled there.
#define ZC_NCCL_CHECK(expr)                                \
  do {                                                     \
    ncclResult_t r_ = (expr);                              \
    TORCH_CHECK(r_ == ncclSuccess || r_ == ncclInProgress, \
                "zerocomm: NCCL error in " #expr ": ",     \
                ncclGetErrorString(r_));                   \
  } while (0)

// How often a non-blocking call in progress is polled.
constexpr auto kPoll = std::chrono::microseconds(50);

ncclDataType_t to_nccl(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ncclFloat32;
    case at::kHalf:
      return ncclFloat16;
    case at::kBFloat16:
      return ncclBfloat16;
    case at::kDouble:
      return ncclFloat64;
    case at::kInt:
      return ncclInt32;
    case at::kLong:
      return ncclInt64;
    case at::kByte:
    case at::kBool:
      return ncclUint8;
    case at::kChar:
      return ncclInt8;
    default:
      TORCH_CHECK_TYPE(false, "zerocomm: NCCL cannot move dtype ", t);
  }
}

// [Note: NCCL non-blocking communicator] The communicator is created with
// config.blocking = 0, so no NCCL call blocks the calling thread: init, the
// lazy connection a first collective makes, and ncclGroupEnd return
// ncclInProgress, and the caller polls ncclCommGetAsyncError until the
// communicator is ncclSuccess again before the next call (settle()).
// `mu_` serialises every use of `comm_` (NCCL forbids concurrent calls on one
// communicator) and is only ever held for one such non-blocking call or one
// poll, never while waiting: settle() drops it between polls. So
//  * the watchdog's check_error() takes it with try_lock and never waits
//    behind a collective (a busy lock means a collective is being issued
//    and it settles, and reports, its own error);
//  * abort() always gets the lock within one call's time, sets the abort
//    flag first (the pollers stop at their next poll), then calls
//    ncclCommAbort under the lock: never concurrently with another NCCL call
//    on this communicator; comm_ is nulled there and every later use throws
//    "aborted" instead of touching freed memory;
//  * the destructor takes the lock the same way and never waits forever.
// A call still in progress when `timeout` passes (a peer that never
// connects) aborts the communicator and throws.
class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const std::string& id, int rank, int size, int device,
                   std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), device_(device), timeout_(timeout) {
    TORCH_CHECK_VALUE(id.size() == sizeof(ncclUniqueId),
                      "NCCL unique id must be ", sizeof(ncclUniqueId),
                      " bytes, got ", id.size());
    TORCH_CHECK_VALUE(timeout.count() > 0, "timeout must be positive");
    ncclUniqueId uid;
    std::memcpy(&uid, id.data(), sizeof(uid));
    const c10::cuda::CUDAGuard guard(device);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclCommInitRankConfig(&comm_, size, uid, rank, &config));
    try {
      settle(lock, "ncclCommInitRankConfig");
    } catch (...) {
      // settle() aborted it on a timeout or an error; a failed init may
      // still have left a handle to free.
      if (comm_ != nullptr) ncclCommAbort(comm_);
      comm_ = nullptr;
      throw;
    }
  }
  ~NcclCommunicator() override {
    const c10::cuda::CUDAGuard guard(device_);
    std::lock_guard<std::mutex> lock(mu_);  // held only for one call: no wait
    // No throw from a destructor. Destroy flushes what was issued; the
    // scheduler drained (or aborted) everything before dropping us.
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    comm_ = nullptr;
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }

  void broadcast(at::Tensor& t, int root) override {
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(),
                                to_nccl(t.scalar_type()), root,
                                live("broadcast"), stream()));
    settle(lock, "broadcast");
  }
  void all_gather(at::Tensor& flat) override {
    // In place: NCCL allows sendbuff == recvbuff + rank * count.
    const int64_t count = flat.numel() / size_;
    char* base = static_cast<char*>(flat.data_ptr());
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclAllGather(base + rank_ * count * flat.element_size(),
                                base, count, to_nccl(flat.scalar_type()),
                                live("all_gather"), stream()));
    settle(lock, "all_gather");
  }
  void reduce(at::Tensor& t, int root, bool average) override {
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclReduce(t.data_ptr(), t.data_ptr(), t.numel(),
                             to_nccl(t.scalar_type()), op(average), root,
                             live("reduce"), stream()));
    settle(lock, "reduce");
  }
  void reduce_scatter(at::Tensor& flat, at::Tensor& shard,
                      bool average) override {
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclReduceScatter(flat.data_ptr(), shard.data_ptr(),
                                    shard.numel(), to_nccl(flat.scalar_type()),
                                    op(average), live("reduce_scatter"),
                                    stream()));
    settle(lock, "reduce_scatter");
  }
  void all_reduce(at::Tensor& t, bool average) override {
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(),
                                to_nccl(t.scalar_type()), op(average),
                                live("all_reduce"), stream()));
    settle(lock, "all_reduce");
  }
  // Between the two, the collectives above only queue (a group is settled
  // once, at its end): nothing is in progress until ncclGroupEnd.
  void group_start() override {
    std::lock_guard<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclGroupStart());
  }
  void group_end() override {
    std::unique_lock<std::mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclGroupEnd());
    settle(lock, "ncclGroupEnd");
  }
  void warm_up() override {
    // Connects the ring now, on the comm stream, from the attaching thread.
    auto t = at::zeros({1}, at::TensorOptions()
                                .dtype(at::kFloat)
                                .device(at::Device(at::kCUDA, device_)));
    all_reduce(t, false);
  }

 protected:
  void check_async_error() override {
    ncclResult_t async = ncclSuccess;
    {
      // Never waits: a collective holding the lock settles its own error.
      std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
      if (!lock.owns_lock() || comm_ == nullptr) return;
      // The watchdog thread calls this: its current device must be ours.
      const c10::cuda::CUDAGuard guard(device_);
      ZC_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
    }
    if (async != ncclSuccess && async != ncclInProgress) {
      abort();
      TORCH_CHECK(false, "zerocomm: NCCL communicator failed: ",
                  ncclGetErrorString(async));
    }
  }
  void abort_transport() override {
    // The abort flag is already set (Communicator::abort): a caller polling
    // in settle() stops at its next poll, so the lock comes within one
    // non-blocking call. ncclCommAbort ends the kernels of in-flight
    // collectives on every stream, then frees the communicator.
    const c10::cuda::CUDAGuard guard(device_);
    std::lock_guard<std::mutex> lock(mu_);
    ncclComm_t comm = comm_;
    comm_ = nullptr;
    if (comm != nullptr) ncclCommAbort(comm);
  }

 private:
  // The communicator, or an "aborted" error (caller holds mu_).
  ncclComm_t live(const char* op) const {
    throw_if_aborted(op);
    TORCH_CHECK(comm_ != nullptr, "zerocomm: ", op,
                " on the nccl communicator after it was aborted");
    return comm_;
  }
  // Polls until the last call is no longer in progress; the lock is dropped
  // between polls so that abort() and the watchdog get through. Throws, after
  // aborting the communicator, on an error, on abort() or after `timeout_`.
  void settle(std::unique_lock<std::mutex>& lock, const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      ncclResult_t state = ncclSuccess;
      if (comm_ == nullptr) break;  // aborted meanwhile: reported below
      ZC_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) {
        lock.unlock();
        abort();
        TORCH_CHECK(false, "zerocomm: NCCL ", op,
                    " failed: ", ncclGetErrorString(state));
      }
      if (flag_->is_set()) break;
      if (std::chrono::steady_clock::now() >= deadline) {
        lock.unlock();
        abort();
        TORCH_CHECK(false, "zerocomm: NCCL ", op, " still in progress after ",
                    timeout_.count(),
                    " ms (a peer may have died or never connected); the "
                    "communicator was aborted -- close() this handle");
      }
      lock.unlock();
      std::this_thread::sleep_for(kPoll);
      lock.lock();
    }
    lock.unlock();
    throw_if_aborted(op);
    TORCH_CHECK(false, "zerocomm: ", op,
                " on the nccl communicator after it was aborted");
  }
  ncclRedOp_t op(bool average) const { return average ? ncclAvg : ncclSum; }
  cudaStream_t stream() const {
    return at::cuda::getCurrentCUDAStream(device_).stream();
  }
  std::mutex mu_;
  ncclComm_t comm_ = nullptr;
  int rank_, size_, device_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId uid;
  ZC_NCCL_CHECK(ncclGetUniqueId(&uid));
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

std::shared_ptr<Communicator> make_nccl_communicator(const std::string& id,
                                                     int rank, int size,
                                                     int device,
                                                     int64_t timeout_ms) {
  return std::make_shared<NcclCommunicator>(
      id, rank, size, device, std::chrono::milliseconds(timeout_ms));
}

int nccl_version() {
  int v = 0;
  ncclGetVersion(&v);
  return v;
}

}  // namespace zerocomm
