// CUDA kernels of the group-advantage family (see cuda/advantages.cuh for the contract).
//
// Pipeline, all on one stream, no host sync, no floating-point atomics:
//   1. keys_kernel      key[i] = group_ids[i] (or the sentinel num_groups for an id outside
//                       [0, num_groups), whose advantage is set to NaN here), value[i] = i.
//   2. cub::DeviceRadixSort::SortPairs over the low ceil(log2(num_groups + 1)) bits. LSD radix
//                       sort is stable, so each group's members end up contiguous and in
//                       increasing sample index: the order the CPU kernel adds them in.
//   3. group_kernel     one warp per group: finds the group's range in the sorted keys (binary
//                       search), then pass 1 and pass 2 of fastrl/advantages.h in member order,
//                       write_stats, and (unless scale == batch_std) the members' advantages.
//                       The lanes load 32 members at a time (a parallel gather) and broadcast
//                       them with shuffles; every lane then runs the same sequential fp64
//                       accumulation, so all lanes hold the same, CPU-identical accumulator.
//   4. batch_std only:  batch_variance_kernel (one block: chunks of groups, then a fixed tree, as
//                       advantages::batch_variance), then batch_advantage_kernel (per sample).
// The grid shape only decides which warp handles which group, never an order of additions, so
// the results do not depend on it.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include "cuda/advantages.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

using advantages::GroupAccum;
using advantages::Params;
using advantages::StatsOut;

constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops beyond that
constexpr size_t kAlign = 256;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// First position in sorted keys[0, n) whose key is >= key.
__device__ __forceinline__ int64_t lower_bound(const uint32_t* __restrict__ keys, int64_t n,
                                               uint32_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Every lane of the warp receives lane `src`'s accumulator (field by field).
__global__ void __launch_bounds__(kBlock)
    keys_kernel(const int64_t* __restrict__ group_ids, int64_t num_samples, int64_t num_groups,
                uint32_t* __restrict__ keys, int64_t* __restrict__ index, float* __restrict__ adv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_samples;
       i += stride) {
    const int64_t g = group_ids[i];
    const bool valid = g >= 0 && g < num_groups;
    if (!valid) adv[i] = static_cast<float>(NAN);
    keys[i] = static_cast<uint32_t>(valid ? g : num_groups);
    index[i] = i;
  }
}

// One warp per group. acc_out == nullptr: write the advantages of the members (batch_var unused,
// 0 as on the CPU). Otherwise (scale == batch_std) store the accumulator for the batch merge.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    group_kernel(const T* __restrict__ scores, const double* __restrict__ weights,
                 const uint32_t* __restrict__ keys, const int64_t* __restrict__ index,
                 int64_t num_samples, int64_t num_groups, Params p, float* __restrict__ adv,
                 StatsOut stats, GroupAccum* __restrict__ acc_out) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       g < num_groups; g += num_warps) {  // warp-uniform
    // Lanes 0-15 look for the start of group g, lanes 16-31 for the start of group g + 1.
    const uint32_t target = static_cast<uint32_t>(g) + (lane >= kWarp / 2 ? 1u : 0u);
    const int64_t pos = lower_bound(keys, num_samples, target);
    const int64_t begin = __shfl_sync(kFullMask, pos, 0);
    const int64_t end = __shfl_sync(kFullMask, pos, kWarp / 2);

    // Pass 1: count, sums, min, max, in member (= sample) order.
    GroupAccum a = advantages::accum_empty();
    for (int64_t base = begin; base < end; base += kWarp) {
      const int64_t k = base + lane;
      double x = 0.0, w = 1.0;
      if (k < end) {
        const int64_t i = index[k];
        x = to_double(scores[i]);
        if (weights != nullptr) w = weights[i];
      }
      const int m = static_cast<int>(min64(end - base, kWarp));
      for (int j = 0; j < m; ++j) {
        const double xj = __shfl_sync(kFullMask, x, j);
        const double wj = __shfl_sync(kFullMask, w, j);
        if (advantages::is_member(xj, p)) advantages::accum_first_pass(a, xj, wj);
      }
    }

    // Pass 2: sum of squared deviations from the group mean, same order.
    const double mean = advantages::group_mean(a);
    for (int64_t base = begin; base < end; base += kWarp) {
      const int64_t k = base + lane;
      const double x = k < end ? to_double(scores[index[k]]) : 0.0;
      const int m = static_cast<int>(min64(end - base, kWarp));
      for (int j = 0; j < m; ++j) {
        const double xj = __shfl_sync(kFullMask, x, j);
        if (advantages::is_member(xj, p)) advantages::accum_second_pass(a, xj, mean);
      }
    }

    if (lane == 0) {
      advantages::write_stats(stats, g, a, p.unbiased);
      if (acc_out != nullptr) acc_out[g] = a;
    }
    if (acc_out == nullptr) {
      const advantages::Coefficients c = advantages::coefficients(a, 0.0, p);
      for (int64_t k = begin + lane; k < end; k += kWarp) {
        const int64_t i = index[k];
        adv[i] = advantages::advantage(to_double(scores[i]), c, p);
      }
    }
  }
}

// advantages::batch_variance(acc, num_groups, unbiased) with one block of kBatchChunks threads:
// thread c merges chunk c, then the same pairwise tree as the host version (same bits).
__global__ void __launch_bounds__(advantages::kBatchChunks)
    batch_variance_kernel(const GroupAccum* __restrict__ acc, int64_t num_groups, bool unbiased,
                          double* __restrict__ batch_var) {
  __shared__ Moments part[advantages::kBatchChunks];
  const int c = static_cast<int>(threadIdx.x);
  part[c] = advantages::chunk_moments(acc, num_groups, c);
  __syncthreads();
  for (int s = 1; s < advantages::kBatchChunks; s *= 2) {
    advantages::tree_level(part, c, s);
    __syncthreads();
  }
  if (c == 0) *batch_var = advantages::variance(part[0].m2, part[0].count, unbiased);
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
    batch_advantage_kernel(const T* __restrict__ scores, const int64_t* __restrict__ group_ids,
                           int64_t num_samples, int64_t num_groups,
                           const GroupAccum* __restrict__ acc, const double* __restrict__ batch_var,
                           Params p, float* __restrict__ adv) {
  const double bv = *batch_var;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < num_samples;
       i += stride) {
    const int64_t g = group_ids[i];
    if (g >= 0 && g < num_groups) {
      adv[i] = advantages::advantage(to_double(scores[i]), advantages::coefficients(acc[g], bv, p), p);
    }
  }
}

unsigned blocks_for(int64_t threads) {
  const int64_t b = (threads + kBlock - 1) / kBlock;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Number of key bits that hold 0..num_groups (num_groups itself is the sentinel key).
int key_bits(int64_t num_groups) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= num_groups) ++bits;
  return bits;
}

// Byte offsets of the workspace parts from its 256-aligned start.
struct Layout {
  size_t keys_in, keys_out, index_in, index_out, acc, batch_var, temp;
  size_t temp_bytes;
  size_t total;  // including kAlign slack for an unaligned workspace pointer
  int end_bit;
};

cudaError_t sort_members(void* temp, size_t& temp_bytes, const uint32_t* keys_in,
                         uint32_t* keys_out, const int64_t* index_in, int64_t* index_out,
                         int64_t num_samples, int end_bit, cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, index_in, index_out,
                                         num_samples, 0, end_bit, stream);
}

cudaError_t make_layout(int64_t num_samples, int64_t num_groups, Layout* layout) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxGroups) return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples), g = static_cast<size_t>(num_groups);
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = align_up(off + bytes);
    return at;
  };
  layout->keys_in = take(n * sizeof(uint32_t));
  layout->keys_out = take(n * sizeof(uint32_t));
  layout->index_in = take(n * sizeof(int64_t));
  layout->index_out = take(n * sizeof(int64_t));
  layout->acc = take(g * sizeof(GroupAccum));
  layout->batch_var = take(sizeof(double));
  layout->end_bit = key_bits(num_groups);
  layout->temp_bytes = 0;
  if (num_samples > 0 && num_groups > 0) {
    const cudaError_t err =
        sort_members(nullptr, layout->temp_bytes, nullptr, nullptr, nullptr, nullptr, num_samples,
                     layout->end_bit, nullptr);
    if (err != cudaSuccess) return err;
  }
  layout->temp = take(layout->temp_bytes);
  layout->total = off + kAlign;
  return cudaSuccess;
}

}  // namespace

size_t group_advantages_workspace_bytes(int64_t num_samples, int64_t num_groups) {
  if (num_samples == 0 && num_groups == 0) return 0;
  Layout layout;
  return make_layout(num_samples, num_groups, &layout) == cudaSuccess ? layout.total : 0;
}

template <typename T>
cudaError_t launch_group_advantages(const T* scores, const int64_t* group_ids, const double* weights,
                                    int64_t num_samples, int64_t num_groups,
                                    const advantages::Params& params, float* adv,
                                    const advantages::StatsOut& stats, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxGroups) return cudaErrorInvalidValue;
  if (num_samples == 0 && num_groups == 0) return cudaSuccess;
  Layout layout;
  cudaError_t err = make_layout(num_samples, num_groups, &layout);
  if (err != cudaSuccess) return err;
  if (workspace == nullptr || workspace_bytes < layout.total) return cudaErrorInvalidValue;
  char* base = reinterpret_cast<char*>(
      align_up(reinterpret_cast<uintptr_t>(workspace)));
  uint32_t* keys_in = reinterpret_cast<uint32_t*>(base + layout.keys_in);
  uint32_t* keys_out = reinterpret_cast<uint32_t*>(base + layout.keys_out);
  int64_t* index_in = reinterpret_cast<int64_t*>(base + layout.index_in);
  int64_t* index_out = reinterpret_cast<int64_t*>(base + layout.index_out);
  GroupAccum* acc = reinterpret_cast<GroupAccum*>(base + layout.acc);
  double* batch_var = reinterpret_cast<double*>(base + layout.batch_var);

  if (num_samples > 0) {
    keys_kernel<<<blocks_for(num_samples), kBlock, 0, stream>>>(group_ids, num_samples, num_groups,
                                                                 keys_in, index_in, adv);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (num_groups > 0) {
      size_t temp_bytes = layout.temp_bytes;
      err = sort_members(base + layout.temp, temp_bytes, keys_in, keys_out, index_in, index_out,
                         num_samples, layout.end_bit, stream);
      if (err != cudaSuccess) return err;
    }
  }
  if (num_groups == 0) return cudaSuccess;

  const bool batch_std = params.scale == advantages::Scale::kBatchStd;
  group_kernel<T><<<blocks_for(num_groups * kWarp), kBlock, 0, stream>>>(
      scores, weights, keys_out, index_out, num_samples, num_groups, params, adv, stats,
      batch_std ? acc : nullptr);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (!batch_std) return cudaSuccess;

  batch_variance_kernel<<<1, advantages::kBatchChunks, 0, stream>>>(acc, num_groups, params.unbiased,
                                                                   batch_var);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (num_samples > 0) {
    batch_advantage_kernel<T><<<blocks_for(num_samples), kBlock, 0, stream>>>(
        scores, group_ids, num_samples, num_groups, acc, batch_var, params, adv);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define FASTRL_INSTANTIATE(T)                                                                 \
  template cudaError_t launch_group_advantages<T>(                                           \
      const T*, const int64_t*, const double*, int64_t, int64_t, const advantages::Params&,  \
      float*, const advantages::StatsOut&, void*, size_t, cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
