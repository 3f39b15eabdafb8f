// One kernel launch copies any number of tensors into or out of a flat
// buffer: a device-side table says, per CTA, which tensor and which chunk.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "flatten.h"

namespace zerocomm {
namespace {

constexpr int64_t kChunkBytes = 64 * 1024;  // bytes one CTA copies
constexpr int kThreads = 256;

struct CopyEntry {
  const char* src;
  char* dst;
  int64_t nbytes;
};

struct ChunkEntry {
  int32_t entry;  // index into the CopyEntry table
  int32_t chunk;  // chunk number inside that entry
};

__device__ __forceinline__ void copy_bytes(const char* __restrict__ src,
                                           char* __restrict__ dst, int64_t n) {
  const auto s = reinterpret_cast<uintptr_t>(src);
  const auto d = reinterpret_cast<uintptr_t>(dst);
  if (((s | d) & 15) == 0) {
    // 16-byte vector loads/stores: the path every aligned slot takes.
    const int64_t nvec = n / 16;
    const auto* vs = reinterpret_cast<const uint4*>(src);
    auto* vd = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) vd[i] = vs[i];
    for (int64_t i = nvec * 16 + threadIdx.x; i < n; i += blockDim.x)
      dst[i] = src[i];
  } else if (((s | d) & 3) == 0) {
    const int64_t nw = n / 4;
    const auto* ws = reinterpret_cast<const uint32_t*>(src);
    auto* wd = reinterpret_cast<uint32_t*>(dst);
    for (int64_t i = threadIdx.x; i < nw; i += blockDim.x) wd[i] = ws[i];
    for (int64_t i = nw * 4 + threadIdx.x; i < n; i += blockDim.x)
      dst[i] = src[i];
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

__global__ void fused_copy_kernel(const CopyEntry* __restrict__ entries,
                                  const ChunkEntry* __restrict__ chunks) {
  const ChunkEntry c = chunks[blockIdx.x];
  const CopyEntry e = entries[c.entry];
  const int64_t begin = static_cast<int64_t>(c.chunk) * kChunkBytes;
  const int64_t n = min(kChunkBytes, e.nbytes - begin);
  copy_bytes(e.src + begin, e.dst + begin, n);
}

}  // namespace

void fused_copy_cuda(const std::vector<at::Tensor>& tensors,
                     const FlatLayout& layout, const at::Tensor& flat,
                     bool to_flat) {
  const int64_t elem = flat.element_size();
  char* flat_base = static_cast<char*>(flat.data_ptr());
  std::vector<CopyEntry> entries;
  std::vector<ChunkEntry> chunks;
  entries.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t nbytes = layout.numels[i] * elem;
    if (nbytes == 0) continue;
    char* packed = static_cast<char*>(tensors[i].data_ptr());
    char* in_flat = flat_base + layout.offsets[i] * elem;
    if (packed == in_flat) continue;  // already a view of its slot
    const auto idx = static_cast<int32_t>(entries.size());
    entries.push_back(to_flat ? CopyEntry{packed, in_flat, nbytes}
                              : CopyEntry{in_flat, packed, nbytes});
    const int64_t n_chunks = (nbytes + kChunkBytes - 1) / kChunkBytes;
    for (int64_t c = 0; c < n_chunks; ++c)
      chunks.push_back({idx, static_cast<int32_t>(c)});
  }
  if (chunks.empty()) return;

  // Both tables travel in one pinned host buffer and one async copy; the
  // caching host allocator keeps it alive until the copy has run.
  const int64_t entry_bytes = entries.size() * sizeof(CopyEntry);
  const int64_t table_bytes = entry_bytes + chunks.size() * sizeof(ChunkEntry);
  auto host = at::empty(
      {table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), entry_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + entry_bytes, chunks.data(),
              chunks.size() * sizeof(ChunkEntry));
  const c10::cuda::CUDAGuard guard(flat.device());
  auto device_table = host.to(flat.device(), /*non_blocking=*/true);
  const auto* d_entries =
      reinterpret_cast<const CopyEntry*>(device_table.data_ptr());
  const auto* d_chunks = reinterpret_cast<const ChunkEntry*>(
      static_cast<const char*>(device_table.data_ptr()) + entry_bytes);
  auto stream = at::cuda::getCurrentCUDAStream();
  fused_copy_kernel<<<static_cast<unsigned>(chunks.size()), kThreads, 0,
                      stream>>>(d_entries, d_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace zerocomm
