// CUDA kernels of the group-advantage family: torch-free launch functions (raw device pointers,
// sizes, a caller-allocated workspace, a stream). csrc/torch/advantages.cpp checks and dispatches.
//
// Same numbers as fastrl::cpu::group_advantages: every group's statistics are accumulated in fp64
// in sample order with the shared math of fastrl/advantages.h, so for valid inputs the outputs are
// bitwise equal to the CPU path and independent of the grid shape. No floating-point atomics, no
// host synchronization: everything is enqueued on `stream`.
//
// One difference, because a device-side check cannot raise without a host sync: a sample whose
// group id lies outside [0, num_groups) belongs to no group (it is left out of every statistic)
// and gets a NaN advantage, where the CPU op raises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastrl/advantages.h"

namespace fastrl {
namespace cuda {

// Largest num_groups the CUDA kernels take (group ids are sorted as 32-bit keys).
constexpr int64_t kMaxGroups = 2147483646;

// Bytes of device workspace launch_group_advantages needs for these sizes (call it with the
// device of the launch current). 0 when num_samples == num_groups == 0, or when the size query
// failed (the launch then returns that error).
size_t group_advantages_workspace_bytes(int64_t num_samples, int64_t num_groups);

// scores[num_samples] (float, double, __half, __nv_bfloat16), group_ids[num_samples] int64 in any
// order, weights[num_samples] fp64 or nullptr (then every weight is 1), all on the current device.
// Writes adv[num_samples] and stats.{count,mean,std,min,max}[num_groups].
// `workspace` holds at least group_advantages_workspace_bytes(num_samples, num_groups) bytes
// (any alignment). Returns cudaErrorInvalidValue for bad sizes, else the first launch error.
//
// Extra memory: the workspace, about 24 * num_samples + 56 * num_groups bytes plus cub's sort
// storage. Time: the per-group passes are sequential within each group (one warp per group, the
// fp64 sums added in sample order, as on the CPU), so a group of n members costs O(n) latency;
// scale="batch_std" adds one sequential merge over the groups (in index order, as on the CPU).
template <typename T>
cudaError_t launch_group_advantages(const T* scores, const int64_t* group_ids, const double* weights,
                                    int64_t num_samples, int64_t num_groups,
                                    const advantages::Params& params, float* adv,
                                    const advantages::StatsOut& stats, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream);

#define FASTRL_DECLARE_LAUNCH(T)                                                               \
  extern template cudaError_t launch_group_advantages<T>(                                     \
      const T*, const int64_t*, const double*, int64_t, int64_t, const advantages::Params&,   \
      float*, const advantages::StatsOut&, void*, size_t, cudaStream_t);
FASTRL_DECLARE_LAUNCH(float)
FASTRL_DECLARE_LAUNCH(double)
FASTRL_DECLARE_LAUNCH(__half)
FASTRL_DECLARE_LAUNCH(__nv_bfloat16)
#undef FASTRL_DECLARE_LAUNCH

}  // namespace cuda
}  // namespace fastrl
