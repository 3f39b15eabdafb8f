// zerocomm's own NCCL communicator: created from a unique id that Python
// exchanges once over the user's process group, so it works wherever
// torch.distributed does (torchrun, Slurm, multi-node).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>

#include <chrono>
#include <cstring>
#include <mutex>

#include "communicator.h"

namespace zerocomm {
namespace {

#define ZC_NCCL_CHECK(expr)                                \
  do {                                                     \
    ncclResult_t r_ = (expr);                              \
    TORCH_CHECK(r_ == ncclSuccess || r_ == ncclInProgress, \
                "zerocomm: NCCL error in " #expr ": ",     \
                ncclGetErrorString(r_));                   \
  } while (0)

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

// Thread safety: the watchdog calls check_error() and abort() while the
// host thread issues collectives. `mu_` guards `comm_`; ncclCommAbort frees
// the communicator, so it is nulled under the lock and every later use
// throws "aborted" instead of touching freed memory.
class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const std::string& id, int rank, int size, int device)
      : rank_(rank), size_(size), device_(device) {
    TORCH_CHECK_VALUE(id.size() == sizeof(ncclUniqueId),
                      "NCCL unique id must be ", sizeof(ncclUniqueId),
                      " bytes, got ", id.size());
    ncclUniqueId uid;
    std::memcpy(&uid, id.data(), sizeof(uid));
    const c10::cuda::CUDAGuard guard(device);
    ZC_NCCL_CHECK(ncclCommInitRank(&comm_, size, uid, rank));
  }
  ~NcclCommunicator() override {
    const c10::cuda::CUDAGuard guard(device_);
    std::lock_guard<std::timed_mutex> lock(mu_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);  // no throw from a destructor
    comm_ = nullptr;
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }

  void broadcast(at::Tensor& t, int root) override {
    std::lock_guard<std::timed_mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(),
                                to_nccl(t.scalar_type()), root,
                                live("broadcast"), stream()));
  }
  void all_gather(at::Tensor& flat) override {
    // In place: NCCL allows sendbuff == recvbuff + rank * count.
    const int64_t count = flat.numel() / size_;
    char* base = static_cast<char*>(flat.data_ptr());
    std::lock_guard<std::timed_mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclAllGather(base + rank_ * count * flat.element_size(),
                                base, count, to_nccl(flat.scalar_type()),
                                live("all_gather"), stream()));
  }
  void reduce(at::Tensor& t, int root, bool average) override {
    std::lock_guard<std::timed_mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclReduce(t.data_ptr(), t.data_ptr(), t.numel(),
                             to_nccl(t.scalar_type()), op(average), root,
                             live("reduce"), stream()));
  }
  void reduce_scatter(at::Tensor& flat, at::Tensor& shard,
                      bool average) override {
    std::lock_guard<std::timed_mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclReduceScatter(flat.data_ptr(), shard.data_ptr(),
                                    shard.numel(), to_nccl(flat.scalar_type()),
                                    op(average), live("reduce_scatter"),
                                    stream()));
  }
  void all_reduce(at::Tensor& t, bool average) override {
    std::lock_guard<std::timed_mutex> lock(mu_);
    ZC_NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(),
                                to_nccl(t.scalar_type()), op(average),
                                live("all_reduce"), stream()));
  }
  void group_start() override { ZC_NCCL_CHECK(ncclGroupStart()); }
  void group_end() override { ZC_NCCL_CHECK(ncclGroupEnd()); }
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
      // The watchdog thread calls this: its current device must be ours.
      const c10::cuda::CUDAGuard guard(device_);
      std::lock_guard<std::timed_mutex> lock(mu_);
      ZC_NCCL_CHECK(ncclCommGetAsyncError(live("check_error"), &async));
    }
    if (async != ncclSuccess && async != ncclInProgress) {
      abort();
      TORCH_CHECK(false, "zerocomm: NCCL communicator failed: ",
                  ncclGetErrorString(async));
    }
  }
  void abort_transport() override {
    // Ends the kernels of in-flight collectives on every stream, then frees
    // the communicator.
    const c10::cuda::CUDAGuard guard(device_);
    // A collective holds mu_ only while it enqueues. One that blocks inside
    // NCCL (a connection to a dead peer) is what ncclCommAbort exists to
    // unblock, so after a grace period abort without the lock.
    std::unique_lock<std::timed_mutex> lock(mu_, std::defer_lock);
    if (!lock.try_lock_for(std::chrono::seconds(2))) {
      TORCH_WARN(
          "zerocomm: aborting the NCCL communicator while a call into "
          "NCCL is still blocked");
    }
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
  ncclRedOp_t op(bool average) const { return average ? ncclAvg : ncclSum; }
  cudaStream_t stream() const {
    return at::cuda::getCurrentCUDAStream(device_).stream();
  }
  std::timed_mutex mu_;
  ncclComm_t comm_ = nullptr;
  int rank_, size_, device_;
};

}  // namespace

std::string nccl_unique_id() {
  ncclUniqueId uid;
  ZC_NCCL_CHECK(ncclGetUniqueId(&uid));
  return std::string(reinterpret_cast<const char*>(&uid), sizeof(uid));
}

std::shared_ptr<Communicator> make_nccl_communicator(const std::string& id,
                                                     int rank, int size,
                                                     int device) {
  return std::make_shared<NcclCommunicator>(id, rank, size, device);
}

int nccl_version() {
  int v = 0;
  ncclGetVersion(&v);
  return v;
}

}  // namespace zerocomm
