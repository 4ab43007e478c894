// CUDA kernels of the best-of-N / selection family (see cuda/selection.cuh for the contract).
//
// Both ops start from a cub radix sort of the samples by group id (32-bit keys, only the bits the
// ids need; LSD, so stable), then run one thread per group over its contiguous segment, which it
// finds by binary search: best_of_n the bounded top-k insert, expected_best_of_k (whose values
// are first sorted by value, so each segment comes out ascending) the order-statistic sums.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>

#include "cuda/selection.cuh"

namespace fastrl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kGridCap = 1 << 16;  // grid-stride loops beyond that
constexpr size_t kChunk = 256;         // alignment of every workspace part

__device__ __forceinline__ double as_double(float x) { return x; }
__device__ __forceinline__ double as_double(double x) { return x; }
__device__ __forceinline__ double as_double(__half x) { return __half2float(x); }
__device__ __forceinline__ double as_double(__nv_bfloat16 x) { return __bfloat162float(x); }

__global__ void __launch_bounds__(kThreads)
    sort_keys_kernel(const int64_t* __restrict__ group_ids, int64_t n, int64_t num_groups,
                     uint32_t* __restrict__ keys, int64_t* __restrict__ values) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = group_ids[i];
    keys[i] = static_cast<uint32_t>(g >= 0 && g < num_groups ? g : num_groups);
    if (values != nullptr) values[i] = i;
  }
}

// First position of sorted keys[0, n) holding a key >= target.
__device__ __forceinline__ int64_t segment_start(const uint32_t* __restrict__ keys, int64_t n,
                                                 uint32_t target) {
  int64_t lo = 0;
  while (n > 0) {
    const int64_t half = n >> 1;
    if (keys[lo + half] < target) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_kernel(const T* __restrict__ scores, const uint32_t* __restrict__ keys,
                const int64_t* __restrict__ members, int64_t num_samples, int64_t num_groups,
                int64_t k, bool largest, double* __restrict__ keys_ws, int64_t* __restrict__ out) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < num_groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = segment_start(keys, num_samples, static_cast<uint32_t>(g));
    const int64_t end = segment_start(keys, num_samples, static_cast<uint32_t>(g + 1));
    double* key = keys_ws + g * k;
    int64_t* idx = out + g * k;  // the list's indices live in the output row
    selection::topk_clear(key, idx, k);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = members[p];
      const double x = as_double(scores[i]);
      if (x != x) continue;  // NaN: never selected
      selection::topk_offer(key, idx, k, selection::topk_key(x, largest), i);
    }
    selection::topk_write(idx, k, idx);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    to_double_kernel(const T* __restrict__ scores, int64_t n, double* __restrict__ vals) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    vals[i] = as_double(scores[i]);
  }
}

// The ks of one launch, passed by value (no host-to-device copy): columns first..first+num-1.
constexpr int kKsPerLaunch = 32;
struct KChunk {
  int64_t k[kKsPerLaunch];
  int64_t num, first, num_k;  // num_k: the output's row length
};

// One thread per group over its segment of `vals` (sorted by group, ascending within a group).
__global__ void __launch_bounds__(kThreads)
    expected_best_kernel(const double* __restrict__ vals, const uint32_t* __restrict__ keys,
                         int64_t num_samples, int64_t num_groups, KChunk ks, bool replacement,
                         bool largest, double* __restrict__ out) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < num_groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = segment_start(keys, num_samples, static_cast<uint32_t>(g));
    const int64_t end = segment_start(keys, num_samples, static_cast<uint32_t>(g + 1));
    const int64_t n = end - begin;
    bool has_nan = false;
    for (int64_t p = begin; p < end; ++p) has_nan |= vals[p] != vals[p];
    // best first: from the segment's last value (largest) or its first (smallest)
    const double* v = largest && n > 0 ? vals + end - 1 : vals + begin;
    const int64_t step = largest ? -1 : 1;
    double* row = out + g * ks.num_k + ks.first;
    for (int64_t j = 0; j < ks.num; ++j) {
      row[j] = has_nan ? NAN : selection::expected_best(v, step, n, ks.k[j], replacement);
    }
  }
}

unsigned grid_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kGridCap ? kGridCap : b));
}

size_t round_up(size_t bytes) { return (bytes + kChunk - 1) / kChunk * kChunk; }

// A workspace cut into N parts, each starting kChunk-aligned from the workspace's first
// kChunk-aligned byte.
template <int N>
struct Parts {
  size_t sizes[N] = {};

  size_t offset(int part) const {
    size_t off = 0;
    for (int j = 0; j < part; ++j) off += round_up(sizes[j]);
    return off;
  }
  size_t total() const { return offset(N) + kChunk; }  // + slack for an unaligned pointer
  void* part(void* workspace, int j) const {
    const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + kChunk - 1) / kChunk * kChunk;
    return reinterpret_cast<void*>(base + offset(j));
  }
};

// Radix-sort bits that hold the keys 0..num_groups (num_groups: the out-of-range sentinel).
int group_key_bits(int64_t num_groups) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= num_groups) ++bits;
  return bits;
}

// best_of_n's workspace: sort keys in/out (uint32), member indices in/out (int64), the top-k
// values (fp64, num_groups * k), cub's temporary storage.
struct TopkPlan {
  Parts<6> parts;
  int sort_bits;
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, int64_t k, TopkPlan* plan) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups || k < 1)
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples);
  size_t* sizes = plan->parts.sizes;
  sizes[0] = sizes[1] = n * sizeof(uint32_t);
  sizes[2] = sizes[3] = n * sizeof(int64_t);
  sizes[4] = static_cast<size_t>(num_groups) * static_cast<size_t>(k) * sizeof(double);
  plan->sort_bits = group_key_bits(num_groups);
  size_t temp = 0;
  if (num_samples > 0) {
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(
        nullptr, temp, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), num_samples, 0,
        plan->sort_bits, nullptr);
    if (err != cudaSuccess) return err;
  }
  sizes[5] = temp;
  return cudaSuccess;
}

// expected_best_of_k's workspace: values (fp64) and group keys (uint32), two buffers each, and
// cub's temporary storage for the larger of its two sorts.
struct ExpectedPlan {
  Parts<5> parts;
  int sort_bits;
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, ExpectedPlan* plan) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups)
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples);
  size_t* sizes = plan->parts.sizes;
  sizes[0] = sizes[1] = n * sizeof(double);
  sizes[2] = sizes[3] = n * sizeof(uint32_t);
  plan->sort_bits = group_key_bits(num_groups);
  size_t by_value = 0, by_group = 0;
  if (num_samples > 0) {
    cudaError_t err = cub::DeviceRadixSort::SortPairs(
        nullptr, by_value, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
        static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), num_samples, 0,
        static_cast<int>(8 * sizeof(double)), nullptr);
    if (err != cudaSuccess) return err;
    err = cub::DeviceRadixSort::SortPairs(
        nullptr, by_group, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const double*>(nullptr), static_cast<double*>(nullptr), num_samples, 0,
        plan->sort_bits, nullptr);
    if (err != cudaSuccess) return err;
  }
  sizes[4] = by_value > by_group ? by_value : by_group;
  return cudaSuccess;
}

}  // namespace

size_t best_of_n_workspace_bytes(int64_t num_samples, int64_t num_groups, int64_t k) {
  TopkPlan p;
  return plan(num_samples, num_groups, k, &p) == cudaSuccess ? p.parts.total() : 0;
}

template <typename T>
cudaError_t launch_best_of_n(const T* scores, const int64_t* group_ids, int64_t num_samples,
                             int64_t num_groups, int64_t k, bool largest, int64_t* out,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  TopkPlan p;
  cudaError_t err = plan(num_samples, num_groups, k, &p);
  if (err != cudaSuccess) return err;
  if (num_groups == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < p.parts.total()) return cudaErrorInvalidValue;
  auto part = [&](int j) { return p.parts.part(workspace, j); };
  uint32_t* keys_in = static_cast<uint32_t*>(part(0));
  uint32_t* keys = static_cast<uint32_t*>(part(1));
  int64_t* members_in = static_cast<int64_t*>(part(2));
  int64_t* members = static_cast<int64_t*>(part(3));
  double* vals = static_cast<double*>(part(4));
  if (num_samples > 0) {
    sort_keys_kernel<<<grid_for(num_samples), kThreads, 0, stream>>>(group_ids, num_samples,
                                                                     num_groups, keys_in,
                                                                     members_in);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    size_t temp_bytes = p.parts.sizes[5];
    err = cub::DeviceRadixSort::SortPairs(part(5), temp_bytes, keys_in, keys, members_in, members,
                                          num_samples, 0, p.sort_bits, stream);
    if (err != cudaSuccess) return err;
  }
  topk_kernel<T><<<grid_for(num_groups), kThreads, 0, stream>>>(
      scores, keys, members, num_samples, num_groups, k, largest, vals, out);
  return cudaGetLastError();
}

size_t expected_best_of_k_workspace_bytes(int64_t num_samples, int64_t num_groups) {
  ExpectedPlan p;
  return plan(num_samples, num_groups, &p) == cudaSuccess ? p.parts.total() : 0;
}

template <typename T>
cudaError_t launch_expected_best_of_k(const T* scores, const int64_t* group_ids,
                                      int64_t num_samples, int64_t num_groups, const int64_t* ks,
                                      int64_t num_k, bool replacement, bool largest, double* out,
                                      void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  ExpectedPlan p;
  cudaError_t err = plan(num_samples, num_groups, &p);
  if (err != cudaSuccess) return err;
  if (num_k < 1) return cudaErrorInvalidValue;
  for (int64_t j = 0; j < num_k; ++j) {
    if (ks[j] < 1) return cudaErrorInvalidValue;
  }
  if (num_groups == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < p.parts.total()) return cudaErrorInvalidValue;
  auto part = [&](int j) { return p.parts.part(workspace, j); };
  double* vals_in = static_cast<double*>(part(0));
  double* vals = static_cast<double*>(part(1));
  uint32_t* keys_in = static_cast<uint32_t*>(part(2));
  uint32_t* keys = static_cast<uint32_t*>(part(3));
  if (num_samples > 0) {
    sort_keys_kernel<<<grid_for(num_samples), kThreads, 0, stream>>>(group_ids, num_samples,
                                                                     num_groups, keys_in, nullptr);
    to_double_kernel<T><<<grid_for(num_samples), kThreads, 0, stream>>>(scores, num_samples,
                                                                        vals_in);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // by value, then (stable LSD) by group: each group contiguous and ascending
    size_t temp_bytes = p.parts.sizes[4];
    err = cub::DeviceRadixSort::SortPairs(part(4), temp_bytes, vals_in, vals, keys_in, keys,
                                          num_samples, 0, static_cast<int>(8 * sizeof(double)),
                                          stream);
    if (err != cudaSuccess) return err;
    temp_bytes = p.parts.sizes[4];
    err = cub::DeviceRadixSort::SortPairs(part(4), temp_bytes, keys, keys_in, vals, vals_in,
                                          num_samples, 0, p.sort_bits, stream);
    if (err != cudaSuccess) return err;
  }
  for (int64_t first = 0; first < num_k; first += kKsPerLaunch) {
    KChunk chunk{};
    chunk.num = num_k - first < kKsPerLaunch ? num_k - first : kKsPerLaunch;
    chunk.first = first;
    chunk.num_k = num_k;
    for (int64_t j = 0; j < chunk.num; ++j) chunk.k[j] = ks[first + j];
    expected_best_kernel<<<grid_for(num_groups), kThreads, 0, stream>>>(
        vals_in, keys_in, num_samples, num_groups, chunk, replacement, largest, out);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define FASTRL_INSTANTIATE(T)                                                                 \
  template cudaError_t launch_best_of_n<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, \
                                           bool, int64_t*, void*, size_t, cudaStream_t);        \
  template cudaError_t launch_expected_best_of_k<T>(const T*, const int64_t*, int64_t, int64_t,   \
                                                    const int64_t*, int64_t, bool, bool, double*, \
                                                    void*, size_t, cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
