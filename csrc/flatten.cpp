#include "flatten.h"

#include <algorithm>

#include "cpu_copy.h"

namespace zerocomm {
namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

void fused_copy_cpu(const std::vector<at::Tensor>& tensors,
                    const FlatLayout& layout, const at::Tensor& flat,
                    bool to_flat) {
  const int64_t elem = flat.element_size();
  auto* flat_base = static_cast<char*>(flat.data_ptr());
  CopyPieces pieces;
  for (size_t i = 0; i < tensors.size(); ++i) {
    char* packed = static_cast<char*>(tensors[i].data_ptr());
    char* in_flat = flat_base + layout.offsets[i] * elem;
    // A tensor that already is a view of its slot (zero-copy parameters)
    // needs no copy, and memcpy onto itself is undefined.
    if (packed == in_flat) continue;
    const int64_t n = layout.numels[i] * elem;
    to_flat ? pieces.add(in_flat, packed, n) : pieces.add(packed, in_flat, n);
  }
  pieces.run();  // [Note: CPU copy threading]
}

void fused_copy(const std::vector<at::Tensor>& tensors,
                const FlatLayout& layout, const at::Tensor& flat,
                bool to_flat) {
  if (flat.is_cuda()) {
#ifdef ZEROCOMM_WITH_CUDA
    fused_copy_cuda(tensors, layout, flat, to_flat);
    return;
#else
    TORCH_CHECK_VALUE(false,
                      "zerocomm was built without CUDA: rebuild with a CUDA "
                      "toolkit (CUDA_HOME) to flatten CUDA tensors");
#endif
  }
  fused_copy_cpu(tensors, layout, flat, to_flat);
}

}  // namespace

FlatLayout FlatLayout::for_tensors(const std::vector<at::Tensor>& tensors,
                                   int64_t align_bytes, int64_t pad_to) {
  TORCH_CHECK_VALUE(align_bytes > 0 && (align_bytes & (align_bytes - 1)) == 0,
                    "align_bytes must be a positive power of two, got ",
                    align_bytes);
  TORCH_CHECK_VALUE(pad_to >= 1, "pad_to must be >= 1, got ", pad_to);
  FlatLayout layout;
  layout.align_bytes = align_bytes;
  if (!tensors.empty()) layout.dtype = tensors[0].scalar_type();
  const int64_t elem = c10::elementSize(layout.dtype);
  const int64_t align_elems = std::max<int64_t>(1, align_bytes / elem);
  int64_t cursor = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_TYPE(tensors[i].scalar_type() == layout.dtype, "tensor ", i,
                     " has dtype ", tensors[i].scalar_type(),
                     " but tensor 0 has ", layout.dtype,
                     ": a flat buffer holds one dtype");
    cursor = round_up(cursor, align_elems);
    layout.offsets.push_back(cursor);
    layout.numels.push_back(tensors[i].numel());
    cursor += tensors[i].numel();
  }
  layout.total_numel = round_up(cursor, pad_to);
  return layout;
}

FlatLayout FlatLayout::explicit_offsets(std::vector<int64_t> offsets,
                                        std::vector<int64_t> numels,
                                        int64_t total_numel,
                                        at::ScalarType dtype) {
  TORCH_CHECK_VALUE(offsets.size() == numels.size(), "got ", offsets.size(),
                    " offsets but ", numels.size(), " sizes");
  for (size_t i = 0; i < offsets.size(); ++i)
    TORCH_CHECK_VALUE(offsets[i] >= 0 && numels[i] >= 0 &&
                          offsets[i] + numels[i] <= total_numel,
                      "slot ", i, " [", offsets[i], ", ",
                      offsets[i] + numels[i], ") lies outside a buffer of ",
                      total_numel, " elements");
  FlatLayout layout;
  layout.offsets = std::move(offsets);
  layout.numels = std::move(numels);
  layout.total_numel = total_numel;
  layout.dtype = dtype;
  return layout;
}

void check_tensors(const std::vector<at::Tensor>& tensors,
                   const FlatLayout& layout, const at::Tensor& flat,
                   const char* op) {
  TORCH_CHECK_VALUE(tensors.size() == layout.size(), op, ": got ",
                    tensors.size(), " tensors but the layout has ",
                    layout.size(), " slots");
  TORCH_CHECK_VALUE(flat.is_contiguous(), op,
                    ": the flat buffer must be contiguous");
  TORCH_CHECK_VALUE(flat.numel() >= layout.total_numel, op,
                    ": the flat buffer has ", flat.numel(),
                    " elements but the layout needs ", layout.total_numel);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK_TYPE(t.scalar_type() == flat.scalar_type(), op, ": tensor ", i,
                     " has dtype ", t.scalar_type(),
                     " but the flat buffer has ", flat.scalar_type());
    TORCH_CHECK_VALUE(t.device() == flat.device(), op, ": tensor ", i,
                      " is on ", t.device(), " but the flat buffer is on ",
                      flat.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": tensor ", i,
                      " is not contiguous; call .contiguous() first");
    TORCH_CHECK_VALUE(t.numel() == layout.numels[i], op, ": tensor ", i,
                      " has ", t.numel(), " elements but its slot has ",
                      layout.numels[i]);
  }
}

at::Tensor flatten(const std::vector<at::Tensor>& tensors,
                   const FlatLayout& layout, at::Tensor flat) {
  const bool fresh = !flat.defined();
  if (fresh) {
    auto opts = at::TensorOptions().dtype(layout.dtype);
    if (!tensors.empty()) opts = opts.device(tensors[0].device());
    // CPU: zero only the padding below instead of writing everything twice.
    flat = opts.device().is_cpu() ? at::empty({layout.total_numel}, opts)
                                  : at::zeros({layout.total_numel}, opts);
  }
  check_tensors(tensors, layout, flat, "flatten");
  if (fresh && flat.is_cpu()) {
    // Padding must be deterministic: it travels through the collectives.
    int64_t end = 0;
    for (size_t i = 0; i <= layout.size(); ++i) {
      const int64_t next =
          i < layout.size() ? layout.offsets[i] : layout.total_numel;
      if (next > end) flat.narrow(0, end, next - end).zero_();
      if (i < layout.size()) end = std::max(end, next + layout.numels[i]);
    }
  }
  fused_copy(tensors, layout, flat, /*to_flat=*/true);
  return flat;
}

void unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& tensors,
               const FlatLayout& layout) {
  check_tensors(tensors, layout, flat, "unflatten");
  fused_copy(tensors, layout, flat, /*to_flat=*/false);
}

}  // namespace zerocomm
