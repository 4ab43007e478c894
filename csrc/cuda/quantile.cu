// CUDA kernels of the exact masked quantile (see cuda/quantile.cuh for the contract and the
// pipeline, fastrl/quantile.h for the keys and the rank arithmetic).
//
// Why it is exact and race-free: every count is an integer atomic (exact in any order), so each
// pass's histogram, and the digit chosen from it, does not depend on the schedule; the selection
// state lives in global memory and is written only by the one-block select kernels (one thread
// each, after the block's barrier) and read by the next launches on the same stream; the least key
// above lo is an integer atomicMax (order-free). Same inputs, same bits.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/quantile.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

using u64 = unsigned long long;  // the type of the 64-bit integer atomics

constexpr int kThreads = 256;  // threads of the streaming kernels
constexpr int kItems = 8;      // values per thread per tile (loads in flight)
constexpr int kBins = quantile::kBins;  // also the select kernel's block size
constexpr int kBlocksPerSm = 4;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr size_t kStateBytes = 256;  // the histograms start there in the workspace

// The selection, in the workspace (zeroed before the first pass).
template <typename K, typename V>
struct State {
  K prefix;       // digits of the lo-th key chosen so far; after the last pass, the key
  K next_inv;     // ~(least key above it), by atomicMax (0: none seen)
  u64 n;          // masked values (NaN included)
  u64 rank;       // rank of the lo-th value among the values whose key matches prefix
  u64 bin_count;  // how many values match prefix
  int64_t lo, hi;
  V frac;
  unsigned int nan;  // nonzero: a masked NaN
};
static_assert(sizeof(State<unsigned long long, double>) <= kStateBytes, "state too large");
static_assert(kStateBytes + 8 * kBins * sizeof(u64) <= kQuantileWorkspaceBytes,
              "workspace too small");

// torch.lerp as torch's CUDA kernel computes it: ATen/native/Lerp.h's two branches compiled by
// nvcc, which contracts each multiply-add into one FMA (torch.quantile interpolates with it).
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? __fmaf_rn(w, b - a, a) : __fmaf_rn(-(b - a), 1.0f - w, b);
}
__device__ __forceinline__ double torch_lerp(double a, double b, double w) {
  return fabs(w) < 0.5 ? __fma_rn(w, b - a, a) : __fma_rn(-(b - a), 1.0 - w, b);
}

// Whether the hi-th value is the least key above the lo-th (not a copy of it).
template <typename K, typename V>
__device__ __forceinline__ bool needs_next(const State<K, V>& st) {
  return st.n > 0 && st.nan == 0 && quantile::hi_is_next_key(st.lo, st.hi, st.rank, st.bin_count);
}

template <typename K, typename V>
__device__ V threshold_of(const State<K, V>& st) {
  if (st.n == 0 || st.nan != 0) return static_cast<V>(NAN);
  const V lo = quantile::value_of<V>(st.prefix);
  const V hi = needs_next(st) ? quantile::value_of<V>(static_cast<K>(~st.next_inv)) : lo;
  return torch_lerp(lo, hi, st.frac);
}

// Adds one to hist[bin] for each lane with bin >= 0, one atomic per distinct bin of the warp (many
// equal values would otherwise serialize on one bin). Called by all 32 lanes.
__device__ __forceinline__ void add_aggregated(unsigned int* hist, int bin, int lane) {
  if (__ballot_sync(kFullWarp, bin >= 0) == 0) return;  // the same in every lane
  const unsigned peers = __match_any_sync(kFullWarp, bin);
  if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], static_cast<unsigned>(__popc(peers)));
}

// One pass: the histogram of digit (key >> shift) & 0xff over the masked values whose digits above
// it equal st->prefix's, added into hist_out[kBins]. The first pass also flags a masked NaN. A warp
// walks its tile of 32 * kItems values in kItems coalesced rows; the loop bound is the warp's, so
// every lane reaches the warp-wide intrinsics. Per-block counts are 32-bit: a block sees about
// n / (4 * SMs) values, below 2^32 for any tensor that fits in a GPU's memory.
template <typename T, typename M, typename K, typename V>
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const T* __restrict__ x, const M* __restrict__ mask, int64_t n, int shift,
                     State<K, V>* __restrict__ st, u64* __restrict__ hist_out, bool first) {
  __shared__ unsigned int hist[kBins];
  for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
  const K prefix = st->prefix;  // only digits above `shift` are set yet
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kItems;
  bool nan = false;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + (threadIdx.x - lane)) * kItems;
       base < n; base += stride) {
    int bin[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * 32 + lane;
      bin[j] = -1;
      if (i < n && is_valid(mask[i])) {
        const V v = widen(x[i]);
        nan |= v != v;
        const K key = quantile::key_of(v);
        if (quantile::is_candidate(key, prefix, shift)) bin[j] = quantile::digit_of(key, shift);
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) add_aggregated(hist, bin[j], lane);
  }
  if (first) {
    if (__syncthreads_or(nan) && threadIdx.x == 0) atomicOr(&st->nan, 1u);
  }
  __syncthreads();  // the block's histogram is complete
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    const unsigned c = hist[b];
    if (c != 0) atomicAdd(&hist_out[b], static_cast<u64>(c));
  }
}

// One block of kBins threads, thread b owning bin b: the digit whose bin holds the remaining rank
// (exclusive prefix <= rank < inclusive prefix: exactly one bin when a value is left), appended
// to st->prefix with the rank left within it. The first pass counts the values and sets the ranks.
template <typename K, typename V>
__global__ void __launch_bounds__(kBins)
    select_kernel(State<K, V>* __restrict__ st, const u64* __restrict__ hist, int shift,
                  bool first, double q) {
  using Reduce = cub::BlockReduce<u64, kBins>;
  using Scan = cub::BlockScan<u64, kBins>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ u64 target;
  const int b = threadIdx.x;
  const u64 count = hist[b];
  if (first) {
    const u64 n = Reduce(tmp.reduce).Sum(count);  // valid in thread 0
    if (b == 0) {
      const quantile::Ranks<V> r = quantile::ranks<V>(static_cast<int64_t>(n), q);
      st->n = n;
      st->lo = r.lo;
      st->hi = r.hi;
      st->frac = r.frac;
      target = static_cast<u64>(r.lo);
    }
  } else if (b == 0) {
    target = st->rank;
  }
  __syncthreads();  // target is set (st->rank read before its one writer below); tmp is free
  const u64 rank = target;
  u64 below;
  Scan(tmp.scan).ExclusiveSum(count, below);
  if (below <= rank && rank < below + count) {
    st->prefix |= static_cast<K>(b) << shift;
    st->rank = rank - below;
    st->bin_count = count;
  }
}

struct MaxOp {
  template <typename K>
  __device__ __forceinline__ K operator()(K a, K b) const {
    return a < b ? b : a;
  }
};

// The least key above the lo-th, over the masked values, when the hi-th value is not a copy of
// the lo-th (else nothing: every block returns at once). Kept as ~key so that the integer
// atomicMax of the zeroed workspace finds the minimum.
template <typename T, typename M, typename K, typename V>
__global__ void __launch_bounds__(kThreads)
    next_key_kernel(const T* __restrict__ x, const M* __restrict__ mask, int64_t n,
                    State<K, V>* __restrict__ st) {
  if (!needs_next(*st)) return;  // the same in every thread: the state is not written here
  const K lo_key = st->prefix;
  K best = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    if (is_valid(mask[i])) {
      const K key = quantile::key_of(widen(x[i]));
      const K inv = static_cast<K>(~key);
      if (key > lo_key && inv > best) best = inv;
    }
  }
  using Reduce = cub::BlockReduce<K, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const K block_best = Reduce(tmp).Reduce(best, MaxOp());  // valid in thread 0
  if (threadIdx.x == 0 && block_best != 0) atomicMax(&st->next_inv, block_best);
}

// keep[i] = mask[i] && x[i] >= t; each block computes t from the final state (block 0 stores it).
template <typename T, typename M, typename K, typename V>
__global__ void __launch_bounds__(kThreads)
    output_kernel(const T* __restrict__ x, const M* __restrict__ mask, int64_t n,
                  const State<K, V>* __restrict__ st, bool* __restrict__ keep,
                  V* __restrict__ threshold) {
  __shared__ V t_shared;
  if (threadIdx.x == 0) {
    const V t = threshold_of(*st);
    t_shared = t;
    if (blockIdx.x == 0) *threshold = t;
  }
  __syncthreads();
  const V t = t_shared;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    keep[i] = is_valid(mask[i]) && widen(x[i]) >= t;
  }
}

}  // namespace

template <typename T, typename M>
cudaError_t launch_quantile_mask(const T* x, const M* mask, int64_t n, double q, bool* keep,
                                 quantile::value_t<T>* threshold, void* workspace,
                                 size_t workspace_bytes, cudaStream_t stream) {
  using V = quantile::value_t<T>;
  using K = typename quantile::KeyOf<V>::type;
  if (n < 0 || !(q >= 0.0 && q <= 1.0) || workspace_bytes < kQuantileWorkspaceBytes) {
    return cudaErrorInvalidValue;
  }
  auto* st = static_cast<State<K, V>*>(workspace);
  u64* hist = reinterpret_cast<u64*>(static_cast<char*>(workspace) + kStateBytes);
  cudaError_t err = cudaMemsetAsync(workspace, 0, kQuantileWorkspaceBytes, stream);
  if (err != cudaSuccess) return err;
  int device = 0, sms = 0;
  if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) {
    return err;
  }
  // Enough resident blocks to stream x, few enough that the blocks' histogram flushes stay cheap.
  const int64_t tiles = (n + kThreads * kItems - 1) / (kThreads * kItems);
  const int grid = static_cast<int>(
      tiles < 1 ? 1 : (tiles < int64_t{sms} * kBlocksPerSm ? tiles : int64_t{sms} * kBlocksPerSm));
  for (int pass = 0; pass < quantile::num_passes<K>(); ++pass) {
    const int shift = quantile::pass_shift<K>(pass);
    u64* pass_hist = hist + pass * kBins;
    histogram_kernel<T, M, K, V><<<grid, kThreads, 0, stream>>>(x, mask, n, shift, st, pass_hist,
                                                                pass == 0);
    select_kernel<K, V><<<1, kBins, 0, stream>>>(st, pass_hist, shift, pass == 0, q);
  }
  next_key_kernel<T, M, K, V><<<grid, kThreads, 0, stream>>>(x, mask, n, st);
  output_kernel<T, M, K, V><<<grid, kThreads, 0, stream>>>(x, mask, n, st, keep, threshold);
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE(T, M)                                                               \
  template cudaError_t launch_quantile_mask<T, M>(const T*, const M*, int64_t, double, bool*, \
                                                  quantile::value_t<T>*, void*, size_t,       \
                                                  cudaStream_t);
#define FASTRL_INSTANTIATE_MASKS(T) \
  FASTRL_INSTANTIATE(T, bool)       \
  FASTRL_INSTANTIATE(T, uint8_t)    \
  FASTRL_INSTANTIATE(T, int32_t)    \
  FASTRL_INSTANTIATE(T, int64_t)    \
  FASTRL_INSTANTIATE(T, float)      \
  FASTRL_INSTANTIATE(T, double)
FASTRL_INSTANTIATE_MASKS(float)
FASTRL_INSTANTIATE_MASKS(double)
FASTRL_INSTANTIATE_MASKS(__half)
FASTRL_INSTANTIATE_MASKS(__nv_bfloat16)
#undef FASTRL_INSTANTIATE_MASKS
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
