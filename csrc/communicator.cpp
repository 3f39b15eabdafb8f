// The Communicator base: the abort flag, abortable holds of the comm stream,
// and the error checks every communicator shares. No c10d or NCCL here, so
// the CPU-only C++ tests (csrc/tests) link it.
#include "communicator.h"

#include <c10/util/Exception.h>

#include <chrono>

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
  TORCH_CHECK(!closed_.load(), "zerocomm: ", op,
              " on a closed communicator (its zerocomm handle was closed; "
              "attach again)");
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

void Communicator::close() {
  if (!closed_.exchange(true)) release_transport();
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

#ifndef ZEROCOMM_WITH_CUDA
int nccl_version() { return 0; }
#endif

}  // namespace zerocomm
