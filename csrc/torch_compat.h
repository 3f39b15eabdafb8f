// The torch C++ calls whose names differ across the supported torch range
// (pyproject.toml: torch>=2.11,<2.16). One place decides, by the version of
// the torch headers being compiled against; everything else calls these.
#pragma once

#include <torch/version.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>

#define ZEROCOMM_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||           \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace zerocomm::compat {

// c10d's single-tensor all-gather: `all_gather_single` from torch 2.13 on
// (`_allgather_base` stays there as a deprecated alias), `_allgather_base`
// before it.
inline c10::intrusive_ptr<c10d::Work> all_gather_single(c10d::Backend& pg,
                                                        at::Tensor& output,
                                                        at::Tensor& input) {
#if ZEROCOMM_TORCH_AT_LEAST(2, 13)
  return pg.all_gather_single(output, input);
#else
  return pg._allgather_base(output, input);
#endif
}

// c10d's single-tensor reduce-scatter (sum): the same rename.
inline c10::intrusive_ptr<c10d::Work> reduce_scatter_single(c10d::Backend& pg,
                                                            at::Tensor& output,
                                                            at::Tensor& input) {
#if ZEROCOMM_TORCH_AT_LEAST(2, 13)
  return pg.reduce_scatter_single(output, input);
#else
  return pg._reduce_scatter_base(output, input);
#endif
}

}  // namespace zerocomm::compat
