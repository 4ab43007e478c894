// CUDA kernels of the best-of-N / selection family (see cuda/selection.cuh for the contract).
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
    values[i] = i;
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

unsigned grid_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kGridCap ? kGridCap : b));
}

size_t round_up(size_t bytes) { return (bytes + kChunk - 1) / kChunk * kChunk; }

// The workspace, from its first kChunk-aligned byte: sort keys in/out (uint32), member indices
// in/out (int64), the top-k values (fp64, num_groups * k), cub's temporary storage.
struct Parts {
  size_t sizes[6];
  int sort_bits;

  size_t offset(int part) const {
    size_t off = 0;
    for (int j = 0; j < part; ++j) off += round_up(sizes[j]);
    return off;
  }
  size_t total() const { return offset(6) + kChunk; }  // + slack for an unaligned pointer
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, int64_t k, Parts* parts) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups || k < 1)
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples);
  parts->sizes[0] = parts->sizes[1] = n * sizeof(uint32_t);
  parts->sizes[2] = parts->sizes[3] = n * sizeof(int64_t);
  parts->sizes[4] = static_cast<size_t>(num_groups) * static_cast<size_t>(k) * sizeof(double);
  parts->sort_bits = 1;  // enough bits for the keys 0..num_groups (num_groups: the sentinel)
  while (parts->sort_bits < 32 && (int64_t{1} << parts->sort_bits) <= num_groups)
    ++parts->sort_bits;
  size_t temp = 0;
  if (num_samples > 0) {
    const cudaError_t err = cub::DeviceRadixSort::SortPairs(
        nullptr, temp, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr), num_samples, 0,
        parts->sort_bits, nullptr);
    if (err != cudaSuccess) return err;
  }
  parts->sizes[5] = temp;
  return cudaSuccess;
}

}  // namespace

size_t best_of_n_workspace_bytes(int64_t num_samples, int64_t num_groups, int64_t k) {
  Parts parts;
  return plan(num_samples, num_groups, k, &parts) == cudaSuccess ? parts.total() : 0;
}

template <typename T>
cudaError_t launch_best_of_n(const T* scores, const int64_t* group_ids, int64_t num_samples,
                             int64_t num_groups, int64_t k, bool largest, int64_t* out,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Parts parts;
  cudaError_t err = plan(num_samples, num_groups, k, &parts);
  if (err != cudaSuccess) return err;
  if (num_groups == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < parts.total()) return cudaErrorInvalidValue;
  const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + kChunk - 1) / kChunk * kChunk;
  auto part = [&](int j) { return reinterpret_cast<void*>(base + parts.offset(j)); };
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
    size_t temp_bytes = parts.sizes[5];
    err = cub::DeviceRadixSort::SortPairs(part(5), temp_bytes, keys_in, keys, members_in, members,
                                          num_samples, 0, parts.sort_bits, stream);
    if (err != cudaSuccess) return err;
  }
  topk_kernel<T><<<grid_for(num_groups), kThreads, 0, stream>>>(
      scores, keys, members, num_samples, num_groups, k, largest, vals, out);
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE(T)                                                                 \
  template cudaError_t launch_best_of_n<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, \
                                           bool, int64_t*, void*, size_t, cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
