// zerocomm's own NCCL communicator: created from a unique id that Python
// exchanges once over the user's process group, so it works wherever
// torch.distributed does (torchrun, Slurm, multi-node).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>

#include "communicator.h"

namespace zerocomm {
namespace {

#define ZC_NCCL_CHECK(expr)                                                \
  do {                                                                     \
    ncclResult_t r_ = (expr);                                              \
    TORCH_CHECK(r_ == ncclSuccess || r_ == ncclInProgress,                 \
                "zerocomm: NCCL error in " #expr ": ", ncclGetErrorString(r_)); \
  } while (0)

ncclDataType_t to_nccl(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kDouble: return ncclFloat64;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte: case at::kBool: return ncclUint8;
    case at::kChar: return ncclInt8;
    default:
      TORCH_CHECK_TYPE(false, "zerocomm: NCCL cannot move dtype ", t);
  }
}

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
    if (comm_ == nullptr) return;
    if (aborted_) return;
    ncclCommDestroy(comm_);  // no throw from a destructor
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }

  void broadcast(at::Tensor& t, int root) override {
    ZC_NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(),
                                to_nccl(t.scalar_type()), root, comm_,
                                stream()));
  }
  void all_gather(at::Tensor& flat) override {
    // In place: NCCL allows sendbuff == recvbuff + rank * count.
    const int64_t count = flat.numel() / size_;
    char* base = static_cast<char*>(flat.data_ptr());
    ZC_NCCL_CHECK(ncclAllGather(base + rank_ * count * flat.element_size(),
                                base, count, to_nccl(flat.scalar_type()),
                                comm_, stream()));
  }
  void reduce(at::Tensor& t, int root, bool average) override {
    ZC_NCCL_CHECK(ncclReduce(t.data_ptr(), t.data_ptr(), t.numel(),
                             to_nccl(t.scalar_type()), op(average), root,
                             comm_, stream()));
  }
  void reduce_scatter(at::Tensor& flat, at::Tensor& shard,
                      bool average) override {
    ZC_NCCL_CHECK(ncclReduceScatter(flat.data_ptr(), shard.data_ptr(),
                                    shard.numel(), to_nccl(flat.scalar_type()),
                                    op(average), comm_, stream()));
  }
  void all_reduce(at::Tensor& t, bool average) override {
    ZC_NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(),
                                to_nccl(t.scalar_type()), op(average), comm_,
                                stream()));
  }
  void group_start() override { ZC_NCCL_CHECK(ncclGroupStart()); }
  void group_end() override { ZC_NCCL_CHECK(ncclGroupEnd()); }
  void check_error() override {
    ncclResult_t async = ncclSuccess;
    ZC_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
    if (async != ncclSuccess && async != ncclInProgress) {
      abort();
      TORCH_CHECK(false, "zerocomm: NCCL communicator failed: ",
                  ncclGetErrorString(async));
    }
  }
  void abort() override {
    if (comm_ != nullptr && !aborted_) {
      ncclCommAbort(comm_);
      aborted_ = true;
    }
  }

 private:
  ncclRedOp_t op(bool average) const { return average ? ncclAvg : ncclSum; }
  cudaStream_t stream() const {
    return at::cuda::getCurrentCUDAStream(device_).stream();
  }
  ncclComm_t comm_ = nullptr;
  int rank_, size_, device_;
  bool aborted_ = false;
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
