// Fused flatten / unflatten: copy many tensors into (or out of) one flat
// buffer with a single kernel launch (CUDA) or one fused byte copy (CPU:
// cpu_copy.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace zerocomm {

// Where each tensor lives inside a flat buffer, in elements. Built once per
// bucket and reused so a hot loop recomputes nothing.
struct FlatLayout {
  std::vector<int64_t> offsets;
  std::vector<int64_t> numels;
  int64_t total_numel = 0;  // buffer size the layout needs, padding included
  int64_t align_bytes = 16;
  at::ScalarType dtype = at::kFloat;

  // Offsets rounded up to align_bytes; total padded to a multiple of pad_to
  // elements (allgather buffers must split evenly across ranks).
  static FlatLayout for_tensors(const std::vector<at::Tensor>& tensors,
                                int64_t align_bytes, int64_t pad_to = 1);
  // Explicit offsets (e.g. pieces of parameters that fall into one shard).
  static FlatLayout explicit_offsets(std::vector<int64_t> offsets,
                                     std::vector<int64_t> numels,
                                     int64_t total_numel, at::ScalarType dtype);
  size_t size() const { return offsets.size(); }
};

// Validates dtypes, devices, contiguity and sizes against `layout`; the
// messages name the offending tensor index.
void check_tensors(const std::vector<at::Tensor>& tensors,
                   const FlatLayout& layout, const at::Tensor& flat,
                   const char* op);

// tensors -> flat (allocates `flat` when undefined). Returns the flat buffer.
at::Tensor flatten(const std::vector<at::Tensor>& tensors,
                   const FlatLayout& layout, at::Tensor flat);
// flat -> tensors (copies back into the given tensors).
void unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& tensors,
               const FlatLayout& layout);

#ifdef ZEROCOMM_WITH_CUDA
// One launch for the whole table; defined in flatten_cuda.cu.
void fused_copy_cuda(const std::vector<at::Tensor>& tensors,
                     const FlatLayout& layout, const at::Tensor& flat,
                     bool to_flat);
#endif

}  // namespace zerocomm
