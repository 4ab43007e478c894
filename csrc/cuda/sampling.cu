// CUDA kernel of token sampling (see cuda/sampling.cuh for the contract, fastrl/sampling.h for
// the math). One block of kThreads per row (grid-stride over rows); thread i handles elements
// i, i + kThreads, ... of the row in every pass (coalesced loads, recomputing z and e per pass
// instead of keeping a [V] buffer).
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/sampling.cuh"

namespace fastrl {
namespace cuda {
namespace {

using sampling::Thresholds;
using u64 = unsigned long long;  // the type of the integer atomics

constexpr int kThreads = 512;
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
constexpr int kKeyBits = 32;  // float_key(z) for top-k, the bits of e >= 0 for top-p
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

struct MaxOp {
  __device__ float operator()(float a, float b) const { return b > a ? b : a; }
};

using ReduceF = cub::BlockReduce<float, kThreads>;
using ReduceU = cub::BlockReduce<u64, kThreads>;
using ScanU = cub::BlockScan<u64, kThreads>;

struct Shared {
  union {
    typename ReduceF::TempStorage reduce_f;
    typename ReduceU::TempStorage reduce_u;
    typename ScanU::TempStorage scan;
  } tmp;
  u64 hist[kBins];
  u64 above, digit, sum;
  float max_z;
  int64_t token;
};

// The block's sum of `local`, in every thread (integer: exact in any order).
__device__ u64 block_sum(u64 local, Shared& sh) {
  const u64 total = ReduceU(sh.tmp.reduce_u).Sum(local);
  if (threadIdx.x == 0) sh.sum = total;
  __syncthreads();
  const u64 result = sh.sum;
  __syncthreads();  // sh.sum / tmp are reused
  return result;
}

// The largest key v such that the weights of the elements with key >= v reach `target`, over the
// elements for which elem(j, key, weight) returns true (the target must be reachable). One pass
// over the row per digit of the 32-bit key, most significant first: a histogram of the weights of the
// elements matching the digits chosen so far, then the highest digit whose bin (plus everything
// above it) reaches the target.
template <typename Elem>
__device__ uint32_t radix_select(int64_t vocab, double target, Elem elem, Shared& sh) {
  uint32_t prefix = 0, prefix_mask = 0;
  u64 above = 0;  // weight of the elements whose key is above the current prefix
  for (int shift = kKeyBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    for (int b = threadIdx.x; b < kBins; b += kThreads) sh.hist[b] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
      uint32_t key;
      uint64_t weight;
      if (elem(j, key, weight) && (key & prefix_mask) == prefix) {
        atomicAdd(&sh.hist[(key >> shift) & (kBins - 1)], static_cast<u64>(weight));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int b = kBins - 1;
      for (; b > 0 && !sampling::mass_reaches(above + sh.hist[b], target); --b) above += sh.hist[b];
      sh.above = above;
      sh.digit = static_cast<u64>(b);
    }
    __syncthreads();
    above = sh.above;
    prefix |= static_cast<uint32_t>(sh.digit) << shift;
    prefix_mask |= static_cast<uint32_t>(kBins - 1) << shift;
    __syncthreads();  // hist, above, digit are rewritten by the next pass
  }
  return prefix;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                  const double* __restrict__ uniforms, sampling::ParamSource params, int64_t* __restrict__ tokens,
                  float* __restrict__ logprobs, float* __restrict__ raw_logprobs) {
  __shared__ Shared sh;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const T* row = logits + r * row_stride;
    const sampling::RowParams prm = sampling::row_params(params, r);
    const float inv_t = sampling::inv_temperature(prm);
    float m_local = -INFINITY;
    int nan_local = 0;
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
      const float z = to_float(row[j]) * inv_t;
      m_local = z > m_local ? z : m_local;
      nan_local |= z != z;
    }
    const float m_block = ReduceF(sh.tmp.reduce_f).Reduce(m_local, MaxOp());
    const bool any_nan = __syncthreads_or(nan_local) != 0;
    if (threadIdx.x == 0) sh.max_z = m_block;
    __syncthreads();
    const float m = sh.max_z;
    __syncthreads();
    if (!sampling::params_valid(prm) || !sampling::row_valid(m, any_nan)) {  // the same in every thread
      if (threadIdx.x == 0) {
        tokens[r] = -1;
        logprobs[r] = raw_logprobs[r] = NAN;
      }
      continue;
    }
    auto z_of = [&](int64_t j) { return to_float(row[j]) * inv_t; };
    auto e_of = [&](float z) { return expf(z - m); };

    u64 local = 0;
    for (int64_t j = threadIdx.x; j < vocab; j += kThreads) local += sampling::to_fixed(e_of(z_of(j)));
    const u64 raw = block_sum(local, sh);

    Thresholds th{-INFINITY, 0.0f, prm.min_p};
    if (prm.top_k < vocab) {
      const uint32_t key = radix_select(
          vocab, static_cast<double>(prm.top_k),
          [&](int64_t j, uint32_t& k, uint64_t& w) {
            k = sampling::float_key(__float_as_uint(z_of(j) + 0.0f));  // + 0: -0 and +0 share a key
            w = 1;
            return true;
          },
          sh);
      th.z_min = __uint_as_float(sampling::key_bits(key));
    }
    if (prm.top_p < 1.0) {
      u64 topk_mass = raw;
      if (th.z_min > -INFINITY) {
        local = 0;
        for (int64_t j = threadIdx.x; j < vocab; j += kThreads) {
          const float z = z_of(j);
          local += z >= th.z_min ? sampling::to_fixed(e_of(z)) : 0;
        }
        topk_mass = block_sum(local, sh);
      }
      const uint32_t key = radix_select(
          vocab, sampling::top_p_target(topk_mass, prm.top_p),
          [&](int64_t j, uint32_t& k, uint64_t& w) {
            const float z = z_of(j);
            const float e = e_of(z);
            k = __float_as_uint(e);
            w = sampling::to_fixed(e);
            return w > 0 && z >= th.z_min;
          },
          sh);
      th.e_min = __uint_as_float(key);
    }

    const bool truncated = sampling::truncates(th);
    auto kept_w = [&](int64_t j) -> u64 {
      const float z = z_of(j);
      const float e = e_of(z);
      return !truncated || sampling::kept(z, e, th) ? sampling::to_fixed(e) : 0;
    };
    u64 kept_mass = raw;
    if (truncated) {
      local = 0;
      for (int64_t j = threadIdx.x; j < vocab; j += kThreads) local += kept_w(j);
      kept_mass = block_sum(local, sh);
    }
    const u64 target = sampling::sample_target(uniforms[r], kept_mass);

    // The first j whose inclusive prefix of kept w exceeds target: tile by tile, exactly one thread
    // of the crossing tile sees its exclusive prefix <= target < its inclusive prefix.
    u64 before = 0;
    for (int64_t base = 0; base < vocab; base += kThreads) {
      const int64_t j = base + threadIdx.x;
      const u64 w = j < vocab ? kept_w(j) : 0;
      u64 inclusive, tile_total;
      ScanU(sh.tmp.scan).InclusiveSum(w, inclusive, tile_total);
      if (before + inclusive > target && before + inclusive - w <= target) sh.token = j;
      __syncthreads();
      if (before + tile_total > target) break;  // the same in every thread
      before += tile_total;
    }
    if (threadIdx.x == 0) {
      const int64_t y = sh.token;
      const float zy = z_of(y) - m;
      tokens[r] = y;
      logprobs[r] = sampling::token_logprob(zy, kept_mass);
      raw_logprobs[r] = sampling::token_logprob(zy, raw);
    }
    __syncthreads();  // sh.token / tmp are reused by the next row
  }
}

}  // namespace

template <typename T>
cudaError_t launch_sample_tokens(const T* logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                                 const double* uniforms, const sampling::ParamSource& params, int64_t* tokens,
                                 float* logprobs, float* raw_logprobs, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const int64_t blocks = num_rows < kMaxBlocks ? num_rows : kMaxBlocks;
  sample_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      logits, row_stride, num_rows, vocab, uniforms, params, tokens, logprobs, raw_logprobs);
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE(T)                                                                          \
  template cudaError_t launch_sample_tokens<T>(const T*, int64_t, int64_t, int64_t, const double*,     \
                                               const sampling::ParamSource&, int64_t*, float*, float*, \
                                               cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
