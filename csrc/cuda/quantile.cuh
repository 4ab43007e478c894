// CUDA kernels of the exact masked quantile (fastrl.sampling.quantile_mask): a torch-free launch
// function (raw device pointers, sizes, a caller-allocated workspace, a stream).
// csrc/torch/quantile.cpp checks and dispatches.
//
// t = torch.quantile(x[mask], q) bitwise (linear interpolation between the order statistics
// lo = floor(p) and hi = ceil(p), p and the weight computed as fastrl/quantile.h's ranks), found
// by a radix select over the order-preserving keys of the masked values, with no sort, no host
// sync and no floating-point atomics; then keep = mask & (x >= t).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastrl/quantile.h"

namespace fastrl {
namespace cuda {

// Bytes of device workspace launch_quantile_mask needs, whatever the size of x (the selection
// state and one 256-bin histogram per 8-bit digit of a 64-bit key).
constexpr size_t kQuantileWorkspaceBytes = 256 + 8 * 256 * 8;

// x[n] (float, double, __half, __nv_bfloat16), mask[n] (bool, uint8, int32, int64, float, double;
// nonzero = selected), q in [0, 1]. Writes threshold[0] = t, the q-quantile of the selected values
// (NaN if one of them is NaN or none is selected) and keep[n] = mask[i] != 0 && x[i] >= t.
// Returns cudaErrorInvalidValue for bad sizes, q or a short workspace, else the first launch error.
//
// Pipeline, all on `stream`: zero the workspace; for each 8-bit digit of the key, most significant
// first (4 passes for fp32 keys, 8 for fp64), a grid of blocks histograms the digit of the masked
// values whose higher digits equal those chosen so far (a shared-memory histogram with
// warp-aggregated integer atomics, added into the pass's global histogram), then one block scans
// the histogram and picks the digit holding the remaining rank (the first pass also counts the
// values and computes the ranks). That yields the lo-th key and how many values share it; when hi
// = lo + 1 falls past them, one more pass takes the least key above it (an integer atomicMax of the
// complemented keys). A last pass computes t from the state in every block and writes keep. About
// 2 + 2 * (key bits / 8) launches; every pass reads x and mask once.
template <typename T, typename M>
cudaError_t launch_quantile_mask(const T* x, const M* mask, int64_t n, double q, bool* keep,
                                 quantile::value_t<T>* threshold, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream);

#define FASTRL_DECLARE_QUANTILE(T, M)                                                       \
  extern template cudaError_t launch_quantile_mask<T, M>(const T*, const M*, int64_t, double, \
                                                         bool*, quantile::value_t<T>*,       \
                                                         void*, size_t, cudaStream_t);
#define FASTRL_DECLARE_QUANTILE_MASKS(T) \
  FASTRL_DECLARE_QUANTILE(T, bool)       \
  FASTRL_DECLARE_QUANTILE(T, uint8_t)    \
  FASTRL_DECLARE_QUANTILE(T, int32_t)    \
  FASTRL_DECLARE_QUANTILE(T, int64_t)    \
  FASTRL_DECLARE_QUANTILE(T, float)      \
  FASTRL_DECLARE_QUANTILE(T, double)
FASTRL_DECLARE_QUANTILE_MASKS(float)
FASTRL_DECLARE_QUANTILE_MASKS(double)
FASTRL_DECLARE_QUANTILE_MASKS(__half)
FASTRL_DECLARE_QUANTILE_MASKS(__nv_bfloat16)
#undef FASTRL_DECLARE_QUANTILE_MASKS
#undef FASTRL_DECLARE_QUANTILE

}  // namespace cuda
}  // namespace fastrl
