// Output allocation for ops that stream large tensors (token-level [B, T] outputs).
#pragma once

#include <ATen/ATen.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace fastrl {

// at::empty, and on Linux CPU for outputs of 8 MiB and more, madvise(MADV_HUGEPAGE) before the
// first touch. A fresh large CPU tensor is mmap'ed memory: writing it takes one page fault per
// 4 KiB page, which costs more than the arithmetic of a streaming op (a [8192, 2048] fp32 output:
// 26 ms with 4 KiB pages, 8 ms with 2 MiB pages, on a 2-core EPYC). The advice is a hint: where
// transparent huge pages are off it does nothing, and nothing changes but speed. (PyTorch itself
// does this for every large allocation under THP_MEM_ALLOC_ENABLE=1.)
inline at::Tensor empty_streaming_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const size_t bytes = out.nbytes();
  if (out.device().is_cpu() && bytes >= (size_t{8} << 20)) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace fastrl
