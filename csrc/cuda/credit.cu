// CUDA kernels of the token-level credit-assignment family (see cuda/credit.cuh for the contract).
//
// One block per row (grid-stride over rows). A row is processed in tiles of kScanTile tokens from
// its end to its start; each tile is staged through shared memory in reverse order (coalesced
// global loads and stores), each thread takes kItems consecutive positions of the reversed tile,
// and cub::BlockScan runs:
//   GAE only: an exclusive scan with "the latest valid value wins" -> nv_t, the value of the next
//             valid position after t (carried across tiles by a prefix callback);
//   then:     an inclusive scan of the affine pairs (c_t, d_t) of fastrl/credit.h composed
//             first-then-second, carried across tiles; the carry at t is the composite applied to
//             0, i.e. its d.
// With row_moments (fused whitening) each thread also folds the fp64 moments of its valid outputs
// into its running moments, tile after tile, and one block reduction per row merges the threads'.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/credit.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

using credit::Affine;
using credit::ReturnsMode;

constexpr int kBlock = 256;
constexpr int kItems = kScanTile / kBlock;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops beyond that

// Row b's token range: padded [b * row_len, (b+1) * row_len), or packed [cu_seqlens[b],
// cu_seqlens[b+1]) clamped to [0, num_tokens] (unchecked on the device; a decreasing pair is empty).
__device__ __forceinline__ void row_range(const int64_t* __restrict__ cu_seqlens, int64_t b,
                                          int64_t row_len, int64_t num_tokens, int64_t& begin,
                                          int64_t& end) {
  begin = b * row_len;
  end = (b + 1) * row_len;
  if (cu_seqlens != nullptr) {
    begin = min(max(cu_seqlens[b], int64_t{0}), num_tokens);
    end = max(min(cu_seqlens[b + 1], num_tokens), begin);
  }
}

// Summary of a span of positions as seen from its left: the value at its leftmost step position
// (has: there is one; kReset: a masked position counts as a step of value 0) and whether a done
// flag sits on a non-step position left of it (pend: a turn end pending for the step before).
template <typename A>
struct NextValue {
  bool has;
  bool pend;
  A value;
};

// Scan order is right to left: `a` summarizes the positions right of `b`.
struct LatestValid {
  template <typename A>
  __device__ __forceinline__ NextValue<A> operator()(const NextValue<A>& a,
                                                     const NextValue<A>& b) const {
    return b.has ? b : NextValue<A>{a.has, a.pend || b.pend, a.value};
  }
};

struct Compose {
  template <typename A>
  __device__ __forceinline__ Affine<A> operator()(const Affine<A>& a, const Affine<A>& b) const {
    return credit::then(a, b);
  }
};

// Carries a scan across the tiles of a row (cub's BlockPrefixCallbackOp protocol: called by the
// first warp with the tile's aggregate, returns the prefix of the tile).
template <typename V, typename Op>
struct RunningPrefix {
  V running;
  __device__ __forceinline__ V operator()(const V& tile_aggregate) {
    const V prefix = running;
    running = Op()(running, tile_aggregate);
    return prefix;
  }
};

struct MergeMoments {
  __device__ __forceinline__ credit::Moments operator()(const credit::Moments& a,
                                                        const credit::Moments& b) const {
    return credit::moments_merge(a, b);
  }
};

// credit::Moments of the valid ones of N values held by one thread, two passes (sum, then squared
// deviations from the mean) in fp64 without FMA, as the CPU summarizes a span.
template <int N, typename A>
__device__ __forceinline__ credit::Moments items_moments(const A (&x)[N], const bool (&valid)[N]) {
  double count = 0.0, sum = 0.0;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (valid[j]) {
      count += 1.0;
      sum += static_cast<double>(x[j]);
    }
  }
  if (count == 0.0) return credit::moments_empty();
  const double mean = sum / count;
  double m2 = 0.0;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (valid[j]) {
      const double d = static_cast<double>(x[j]) - mean;
      m2 += fastrl::mul_rn(d, d);
    }
  }
  return credit::Moments{count, mean, m2};
}

template <bool kGae, typename T, typename M>
__global__ void __launch_bounds__(kBlock)
    scan_kernel(const T* __restrict__ rewards, const T* __restrict__ values,
                const M* __restrict__ mask, const bool* __restrict__ dones,
                const int64_t* __restrict__ cu_seqlens, int64_t num_rows, int64_t row_len,
                int64_t num_tokens, credit::GaeCoefs<typename CreditAcc<T>::type> coefs,
                credit::GaeMode gae_mode, ReturnsMode mode,
                typename CreditAcc<T>::type* __restrict__ out0,
                typename CreditAcc<T>::type* __restrict__ out1,
                credit::Moments* __restrict__ row_moments) {
  using A = typename CreditAcc<T>::type;
  using AffineScan = cub::BlockScan<Affine<A>, kBlock>;
  using NextScan = cub::BlockScan<NextValue<A>, kBlock>;
  using MomentsReduce = cub::BlockReduce<credit::Moments, kBlock>;
  __shared__ union {
    typename AffineScan::TempStorage affine;
    typename NextScan::TempStorage next;
    typename MomentsReduce::TempStorage moments;
  } temp;
  __shared__ A s_r[kScanTile];
  __shared__ A s_v[kScanTile];
  __shared__ unsigned char s_m[kScanTile];
  const int tid = static_cast<int>(threadIdx.x);

  for (int64_t b = blockIdx.x; b < num_rows; b += gridDim.x) {  // block-uniform
    int64_t begin, end;
    row_range(cu_seqlens, b, row_len, num_tokens, begin, end);
    RunningPrefix<Affine<A>, Compose> affine_prefix{credit::identity<A>()};
    RunningPrefix<NextValue<A>, LatestValid> next_prefix{NextValue<A>{false, false, A(0)}};
    credit::Moments moments = credit::moments_empty();  // of this thread's valid outputs
    for (int64_t tile_end = end; tile_end > begin; tile_end -= kScanTile) {
      const int len = static_cast<int>(min(static_cast<int64_t>(kScanTile), tile_end - begin));
      for (int k = tid; k < len; k += kBlock) {  // reversed, coalesced
        const int64_t pos = tile_end - 1 - k;
        s_r[k] = widen(rewards[pos]);
        if (kGae) s_v[k] = widen(values[pos]);
        s_m[k] = (is_valid(mask[pos]) ? 1 : 0) | (dones != nullptr && dones[pos] ? 2 : 0);
      }
      __syncthreads();

      bool in[kItems], valid[kItems], done[kItems], step[kItems];
      A r[kItems], v[kItems];
      Affine<A> f[kItems];
      const bool dense = gae_mode == credit::GaeMode::kDense;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int k = tid * kItems + j;
        in[j] = k < len;
        valid[j] = in[j] && (s_m[k] & 1) != 0;
        done[j] = in[j] && (s_m[k] & 2) != 0;
        // a step position: GAE dense and returns cumsum step through masked positions too
        step[j] = valid[j] || (in[j] && (kGae ? dense : credit::returns_is_step(false, mode)));
        r[j] = valid[j] ? s_r[k] : A(0);
        // GAE: the raw value (returns = A + v at skip/reset gaps); dense zeroes masked values
        v[j] = (kGae && in[j] && (valid[j] || !dense)) ? s_v[k] : A(0);
      }
      // GAE: next values and pending turn ends; returns: pending turn ends (only with dones)
      NextValue<A> nv[kItems];
      if (kGae || dones != nullptr) {  // block-uniform
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const bool reset_gap =
              kGae && in[j] && !step[j] && gae_mode == credit::GaeMode::kReset;
          nv[j] = NextValue<A>{step[j] || reset_gap, in[j] && !step[j] && done[j],
                               step[j] ? v[j] : A(0)};
        }
        NextScan(temp.next).ExclusiveScan(nv, nv, LatestValid(), next_prefix);
        __syncthreads();  // temp is reused by the affine scan
      } else {
#pragma unroll
        for (int j = 0; j < kItems; ++j) nv[j] = NextValue<A>{false, false, A(0)};
      }
      if (kGae) {
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          if (!in[j]) {
            f[j] = credit::identity<A>();
          } else if (step[j]) {
            f[j] = credit::gae_turn_step(r[j], v[j], nv[j].value, done[j] || nv[j].pend, coefs);
          } else {
            f[j] = credit::gae_gap_step<A>(gae_mode);
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          f[j] = in[j] ? credit::returns_turn_step(r[j], valid[j], done[j] || nv[j].pend,
                                                   coefs.gamma, coefs.turn_gamma, mode)
                       : credit::identity<A>();
        }
      }
      AffineScan(temp.affine).InclusiveScan(f, f, Compose(), affine_prefix);
      __syncthreads();  // every thread has read its staged inputs
      if (row_moments != nullptr) {  // block-uniform; the output at a valid position is its carry
        A carry[kItems];
#pragma unroll
        for (int j = 0; j < kItems; ++j) carry[j] = f[j].d;
        moments = credit::moments_merge(moments, items_moments(carry, valid));
      }

#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int k = tid * kItems + j;
        if (!in[j]) continue;
        if (kGae) {
          s_r[k] = f[j].d;
          s_v[k] = f[j].d + v[j];
        } else {
          s_r[k] = credit::returns_output(f[j].d, valid[j], mode);
        }
      }
      __syncthreads();
      for (int k = tid; k < len; k += kBlock) {
        const int64_t pos = tile_end - 1 - k;
        out0[pos] = s_r[k];
        if (kGae) out1[pos] = s_v[k];
      }
      __syncthreads();  // the staging buffers and temp are reused by the next tile
    }
    if (row_moments != nullptr) {  // block-uniform
      const credit::Moments row = MomentsReduce(temp.moments).Reduce(moments, MergeMoments());
      if (tid == 0) row_moments[b] = row;
      __syncthreads();  // temp is reused by the next row
    }
  }
}

// ------------------------------------------------------------------ KL penalty, token rewards

// An input value in the arithmetic type A (OpenRLHF: double inputs computed in float).
template <typename A, typename T>
__device__ __forceinline__ A load_as(T x) {
  return static_cast<A>(widen(x));
}

template <credit::KlKind K, credit::KlConvention C, typename T, typename A, typename O>
__global__ void kl_kernel(const T* __restrict__ logp, const T* __restrict__ ref, int64_t n,
                          O* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = store_as<O>(credit::kl_value<K, C>(load_as<A>(logp[i]), load_as<A>(ref[i])));
  }
}

template <credit::KlKind K, credit::KlConvention C, typename T, typename A, typename O>
__global__ void kl_grad_kernel(const O* __restrict__ grad, const T* __restrict__ logp,
                               const T* __restrict__ ref, int64_t n, T* __restrict__ grad_logp) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const A g = credit::kl_grad<K, C>(load_as<A>(logp[i]), load_as<A>(ref[i]));
    grad_logp[i] = store_as<T>(load_as<A>(grad[i]) * g);
  }
}

int elementwise_grid(int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

struct MaxOp {
  __device__ __forceinline__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

template <typename T, typename M>
__global__ void __launch_bounds__(kBlock)
    token_rewards_kernel(const T* __restrict__ scores, const M* __restrict__ mask,
                         const T* __restrict__ kl, const int64_t* __restrict__ cu_seqlens,
                         int64_t num_rows, int64_t row_len, int64_t num_tokens,
                         typename CreditAcc<T>::type kl_coef,
                         typename CreditAcc<T>::type* __restrict__ out) {
  using A = typename CreditAcc<T>::type;
  using Reduce = cub::BlockReduce<int64_t, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ int64_t s_last;
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < num_rows; b += gridDim.x) {  // block-uniform
    int64_t begin, end;
    row_range(cu_seqlens, b, row_len, num_tokens, begin, end);
    int64_t last = -1;  // the row's last valid position
    for (int64_t i = begin + tid; i < end; i += kBlock) {
      if (is_valid(mask[i])) last = i;
    }
    last = Reduce(temp).Reduce(last, MaxOp());
    if (tid == 0) s_last = last;
    __syncthreads();
    last = s_last;
    const A score = widen(scores[b]);
    for (int64_t i = begin + tid; i < end; i += kBlock) {
      const A k = kl != nullptr ? widen(kl[i]) : A(0);
      out[i] = credit::token_reward(is_valid(mask[i]), i == last, score, kl_coef, k);
    }
    __syncthreads();  // temp and s_last are reused by the next row
  }
}

// ------------------------------------------------------------------------- segment reductions

struct RowSummary {
  double sum;
  double count;
  int64_t last;  // the last valid position, -1 if none
};

struct MergeSummary {
  __device__ __forceinline__ RowSummary operator()(const RowSummary& a, const RowSummary& b) const {
    return RowSummary{a.sum + b.sum, a.count + b.count, a.last > b.last ? a.last : b.last};
  }
};

template <typename M>
__device__ __forceinline__ bool is_valid_at(const M* mask, int64_t i) {
  return mask == nullptr || is_valid(mask[i]);
}

// The row's (sum, count, last) over its valid tokens, known to every thread of the block: each
// thread sums a fixed strided subset, cub merges the partials in a fixed tree (deterministic).
template <typename T, typename M, typename Reduce>
__device__ RowSummary row_summary(const T* __restrict__ x, const M* __restrict__ mask,
                                  int64_t begin, int64_t end, typename Reduce::TempStorage& temp,
                                  RowSummary& shared) {
  RowSummary part{0.0, 0.0, -1};
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
    if (is_valid_at(mask, i)) {
      part.sum += static_cast<double>(widen(x[i]));
      part.count += 1.0;
      part.last = i;
    }
  }
  const RowSummary total = Reduce(temp).Reduce(part, MergeSummary());
  if (threadIdx.x == 0) shared = total;
  __syncthreads();
  const RowSummary out = shared;
  __syncthreads();  // temp and shared are reused by the next row
  return out;
}

// kGrad false: out[b] = credit::segment_value; true: grad_x (credit::segment_grad times grad[b]).
template <bool kGrad, typename T, typename M>
__global__ void __launch_bounds__(kBlock)
    segment_kernel(const typename CreditAcc<T>::type* __restrict__ grad, const T* __restrict__ x,
                   const M* __restrict__ mask, const int64_t* __restrict__ cu_seqlens,
                   int64_t num_rows, int64_t row_len, int64_t num_tokens, credit::SegmentReduce op,
                   typename CreditAcc<T>::type* __restrict__ out, T* __restrict__ grad_x) {
  using A = typename CreditAcc<T>::type;
  using Reduce = cub::BlockReduce<RowSummary, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ RowSummary shared;
  for (int64_t b = blockIdx.x; b < num_rows; b += gridDim.x) {  // block-uniform
    int64_t begin, end;
    row_range(cu_seqlens, b, row_len, num_tokens, begin, end);
    const RowSummary s = row_summary<T, M, Reduce>(x, mask, begin, end, temp, shared);
    if (!kGrad) {
      if (threadIdx.x == 0) {
        const double last = s.last >= 0 ? static_cast<double>(widen(x[s.last])) : 0.0;
        out[b] = static_cast<A>(credit::segment_value(op, s.sum, s.count, last));
      }
      continue;
    }
    const double g = static_cast<double>(grad[b]);
    const double f = s.count > 0.0 ? credit::segment_grad(op, s.sum, s.count, false) : 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) {
      const double fi = op == credit::SegmentReduce::kLast ? (i == s.last ? 1.0 : 0.0) : f;
      grad_x[i] = store_as<T>(static_cast<A>(is_valid_at(mask, i) ? g * fi : 0.0));
    }
  }
}

// --------------------------------------------------------------------------- implicit rewards

// Per-token rewards: elementwise, grid-stride (a token's reward does not depend on its row).
template <typename T, typename M>
__global__ void implicit_token_kernel(const T* __restrict__ logp, const T* __restrict__ ref,
                                      const M* __restrict__ mask, int64_t n,
                                      typename CreditAcc<T>::type beta,
                                      typename CreditAcc<T>::type* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = is_valid_at(mask, i) ? credit::implicit_reward(widen(logp[i]), widen(ref[i]), beta)
                                  : typename CreditAcc<T>::type(0);
  }
}

// Step sums: one block per row. The block zeroes the row (coalesced), then each thread that owns a
// step start (the row's first position or the position after a flag) walks its step forwards,
// summing in fp64 in token order exactly as the CPU kernel does, and writes the sum at the step's
// last valid token: bitwise the CPU result, deterministic, no atomics. A step is walked by one
// thread, so the latency is that of the longest step (PRIME's steps are short; all-zero flags make
// the whole row one step).
template <typename T, typename M>
__global__ void __launch_bounds__(kBlock)
    implicit_step_kernel(const T* __restrict__ logp, const T* __restrict__ ref,
                         const M* __restrict__ mask, const bool* __restrict__ step_ends,
                         const int64_t* __restrict__ cu_seqlens, int64_t num_rows,
                         int64_t row_len, int64_t num_tokens, typename CreditAcc<T>::type beta,
                         typename CreditAcc<T>::type* __restrict__ out) {
  using A = typename CreditAcc<T>::type;
  for (int64_t b = blockIdx.x; b < num_rows; b += gridDim.x) {  // block-uniform
    int64_t begin, end;
    row_range(cu_seqlens, b, row_len, num_tokens, begin, end);
    for (int64_t i = begin + threadIdx.x; i < end; i += kBlock) out[i] = A(0);
    __syncthreads();  // the zeros land before any step sum overwrites one
    for (int64_t s = begin + threadIdx.x; s < end; s += kBlock) {
      if (s != begin && !step_ends[s - 1]) continue;
      double sum = 0.0;
      int64_t last = -1;
      for (int64_t i = s; i < end; ++i) {
        if (is_valid_at(mask, i)) {
          sum += static_cast<double>(credit::implicit_reward(widen(logp[i]), widen(ref[i]), beta));
          last = i;
        }
        if (step_ends[i]) break;
      }
      if (last >= 0) out[last] = static_cast<A>(sum);
    }
  }
}

// ------------------------------------------------------------------ masked moments, whitening

constexpr int kMomentItems = static_cast<int>(kMomentsChunk / kBlock);

// chunks[c] = moments of chunk c: thread t holds the chunk's elements t, t + 256, ... (coalesced,
// every load in flight at once), summarizes them in two passes, and the block merges the threads'
// summaries in a fixed tree. Elements outside the mask never reach the sums (a NaN there is ignored).
template <typename T, typename M>
__global__ void __launch_bounds__(kBlock)
    moments_kernel(const T* __restrict__ x, const M* __restrict__ mask, int64_t n,
                   int64_t num_chunks, credit::Moments* __restrict__ chunks) {
  using A = typename CreditAcc<T>::type;
  using Reduce = cub::BlockReduce<credit::Moments, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {  // block-uniform
    const int64_t first = c * kMomentsChunk + threadIdx.x;
    A v[kMomentItems];
    bool valid[kMomentItems];
#pragma unroll
    for (int j = 0; j < kMomentItems; ++j) {
      const int64_t i = first + int64_t{j} * kBlock;
      v[j] = i < n ? widen(x[i]) : A(0);
      valid[j] = i < n && is_valid(mask[i]);
    }
    const credit::Moments chunk = Reduce(temp).Reduce(items_moments(v, valid), MergeMoments());
    if (threadIdx.x == 0) chunks[c] = chunk;
    __syncthreads();  // temp is reused by the next chunk
  }
}

// One block: thread t merges parts [t * per, (t + 1) * per) in order, then a fixed block tree.
__global__ void __launch_bounds__(kBlock)
    merge_moments_kernel(const credit::Moments* __restrict__ parts, int64_t num_parts,
                         double* count, double* mean, double* m2, credit::WhitenCoefs* coefs,
                         bool shift_mean, bool unbiased, double eps) {
  using Reduce = cub::BlockReduce<credit::Moments, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t per = (num_parts + kBlock - 1) / kBlock;
  const int64_t begin = min(num_parts, int64_t{threadIdx.x} * per);
  const int64_t end = min(num_parts, begin + per);
  credit::Moments run = credit::moments_empty();
  for (int64_t i = begin; i < end; i += 4) {  // 4 loads in flight, then merged in order
    credit::Moments p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = i + j < end ? parts[i + j] : credit::moments_empty();
#pragma unroll
    for (int j = 0; j < 4; ++j) run = credit::moments_merge(run, p[j]);  // an empty p[j]: no-op
  }
  const credit::Moments total = Reduce(temp).Reduce(run, MergeMoments());
  if (threadIdx.x == 0) {
    *count = total.count;
    *mean = total.mean;
    *m2 = total.m2;
    if (coefs != nullptr) *coefs = credit::whiten_coefs(total, shift_mean, unbiased, eps);
  }
}

constexpr int kWhitenItems = 4;  // elements per thread and step: their loads are in flight together

// Rounded as cpu::affine_transform / masked_affine_transform: fp64 -> A once (then -> T through
// float for half types, as c10::Half(double) does), the mask product in A. No __restrict__ on x
// and out: out may be x (each element is read, then written, by the same thread).
template <typename T, typename M>
__global__ void whiten_kernel(const T* x, const M* __restrict__ mask, int64_t n,
                              const credit::WhitenCoefs* __restrict__ coefs, T* out) {
  using A = typename CreditAcc<T>::type;
  const credit::WhitenCoefs k = *coefs;
  const int64_t step = int64_t{gridDim.x} * blockDim.x * kWhitenItems;
  for (int64_t first = blockIdx.x * int64_t{blockDim.x} * kWhitenItems + threadIdx.x; first < n;
       first += step) {
    A v[kWhitenItems], mv[kWhitenItems];
#pragma unroll
    for (int j = 0; j < kWhitenItems; ++j) {
      const int64_t i = first + int64_t{j} * blockDim.x;
      v[j] = i < n ? widen(x[i]) : A(0);
      mv[j] = mask != nullptr && i < n ? static_cast<A>(mask[i]) : A(1);
    }
#pragma unroll
    for (int j = 0; j < kWhitenItems; ++j) {
      const int64_t i = first + int64_t{j} * blockDim.x;
      if (i < n) {
        A w = static_cast<A>(credit::whiten_value(static_cast<double>(v[j]), k));
        if (mask != nullptr) w = w * mv[j];
        out[i] = store_as<T>(w);
      }
    }
  }
}

bool bad_sizes(int64_t num_rows, int64_t row_len, int64_t num_tokens, const int64_t* cu_seqlens) {
  if (num_rows < 0 || row_len < 0 || num_tokens < 0) return true;
  return cu_seqlens == nullptr && num_rows * row_len != num_tokens;
}

int grid_for(int64_t num_rows) {
  return static_cast<int>(num_rows < kMaxBlocks ? num_rows : kMaxBlocks);
}

}  // namespace

template <typename T, typename M>
cudaError_t launch_gae(const T* rewards, const T* values, const M* mask, const bool* dones,
                       const int64_t* cu_seqlens, int64_t num_rows, int64_t row_len,
                       int64_t num_tokens, double gamma, double lam, credit::GaeMode mode,
                       double turn_gamma, double turn_lam, typename CreditAcc<T>::type* adv,
                       typename CreditAcc<T>::type* ret, credit::Moments* row_moments,
                       cudaStream_t stream) {
  using A = typename CreditAcc<T>::type;
  if (bad_sizes(num_rows, row_len, num_tokens, cu_seqlens)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  const credit::GaeCoefs<A> coefs{static_cast<A>(gamma), static_cast<A>(gamma * lam),
                                  static_cast<A>(turn_gamma), static_cast<A>(turn_gamma * turn_lam)};
  scan_kernel<true, T, M><<<grid_for(num_rows), kBlock, 0, stream>>>(
      rewards, values, mask, dones, cu_seqlens, num_rows, row_len, num_tokens, coefs, mode,
      ReturnsMode::kSkip, adv, ret, row_moments);
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_discounted_returns(const T* rewards, const M* mask, const bool* dones,
                                      const int64_t* cu_seqlens, int64_t num_rows,
                                      int64_t row_len, int64_t num_tokens, double gamma,
                                      ReturnsMode mode, double turn_gamma,
                                      typename CreditAcc<T>::type* out,
                                      credit::Moments* row_moments, cudaStream_t stream) {
  using A = typename CreditAcc<T>::type;
  if (bad_sizes(num_rows, row_len, num_tokens, cu_seqlens)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  // returns use the discounts only (no lambda)
  const credit::GaeCoefs<A> coefs{static_cast<A>(gamma), A(0), static_cast<A>(turn_gamma), A(0)};
  scan_kernel<false, T, M><<<grid_for(num_rows), kBlock, 0, stream>>>(
      rewards, nullptr, mask, dones, cu_seqlens, num_rows, row_len, num_tokens, coefs,
      credit::GaeMode::kSkip, mode, out, nullptr, row_moments);
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_masked_moments(const T* x, const M* mask, int64_t n, credit::Moments* chunks,
                                  cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  const int64_t num_chunks = masked_moments_num_chunks(n);
  if (num_chunks == 0) return cudaSuccess;
  moments_kernel<T, M><<<grid_for(num_chunks), kBlock, 0, stream>>>(x, mask, n, num_chunks, chunks);
  return cudaGetLastError();
}

cudaError_t launch_merge_moments(const credit::Moments* parts, int64_t num_parts, double* count,
                                 double* mean, double* m2, credit::WhitenCoefs* coefs,
                                 bool shift_mean, bool unbiased, double eps, cudaStream_t stream) {
  if (num_parts < 0) return cudaErrorInvalidValue;
  merge_moments_kernel<<<1, kBlock, 0, stream>>>(parts, num_parts, count, mean, m2, coefs,
                                                 shift_mean, unbiased, eps);
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_whiten(const T* x, const M* mask, int64_t n, const credit::WhitenCoefs* coefs,
                          T* out, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  whiten_kernel<T, M><<<elementwise_grid((n + kWhitenItems - 1) / kWhitenItems), kBlock, 0, stream>>>(
      x, mask, n, coefs, out);
  return cudaGetLastError();
}

template <typename T, typename A, typename O>
cudaError_t launch_kl_penalty(const T* logp, const T* ref, int64_t n, credit::KlKind kind,
                              credit::KlConvention conv, O* out, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  credit::dispatch_kl(kind, conv, [&](auto k, auto c) {
    kl_kernel<decltype(k)::value, decltype(c)::value, T, A, O>
        <<<elementwise_grid(n), kBlock, 0, stream>>>(logp, ref, n, out);
  });
  return cudaGetLastError();
}

template <typename T, typename A, typename O>
cudaError_t launch_kl_penalty_grad(const O* grad, const T* logp, const T* ref, int64_t n,
                                   credit::KlKind kind, credit::KlConvention conv, T* grad_logp,
                                   cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  credit::dispatch_kl(kind, conv, [&](auto k, auto c) {
    kl_grad_kernel<decltype(k)::value, decltype(c)::value, T, A, O>
        <<<elementwise_grid(n), kBlock, 0, stream>>>(grad, logp, ref, n, grad_logp);
  });
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_token_rewards(const T* scores, const M* mask, const T* kl,
                                 const int64_t* cu_seqlens, int64_t num_rows, int64_t row_len,
                                 int64_t num_tokens, double kl_coef,
                                 typename CreditAcc<T>::type* out, cudaStream_t stream) {
  using A = typename CreditAcc<T>::type;
  if (bad_sizes(num_rows, row_len, num_tokens, cu_seqlens)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  token_rewards_kernel<T, M><<<grid_for(num_rows), kBlock, 0, stream>>>(
      scores, mask, kl, cu_seqlens, num_rows, row_len, num_tokens, static_cast<A>(kl_coef), out);
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_segment_reduce(const T* x, const M* mask, const int64_t* cu_seqlens,
                                  int64_t num_rows, int64_t row_len, int64_t num_tokens,
                                  credit::SegmentReduce op, typename CreditAcc<T>::type* out,
                                  cudaStream_t stream) {
  if (bad_sizes(num_rows, row_len, num_tokens, cu_seqlens)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  segment_kernel<false, T, M><<<grid_for(num_rows), kBlock, 0, stream>>>(
      nullptr, x, mask, cu_seqlens, num_rows, row_len, num_tokens, op, out, nullptr);
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_segment_reduce_grad(const typename CreditAcc<T>::type* grad, const T* x,
                                       const M* mask, const int64_t* cu_seqlens, int64_t num_rows,
                                       int64_t row_len, int64_t num_tokens,
                                       credit::SegmentReduce op, T* grad_x, cudaStream_t stream) {
  if (bad_sizes(num_rows, row_len, num_tokens, cu_seqlens)) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  segment_kernel<true, T, M><<<grid_for(num_rows), kBlock, 0, stream>>>(
      grad, x, mask, cu_seqlens, num_rows, row_len, num_tokens, op, nullptr, grad_x);
  return cudaGetLastError();
}

template <typename T, typename M>
cudaError_t launch_implicit_rewards(const T* logp, const T* ref, const M* mask,
                                    const bool* step_ends, const int64_t* cu_seqlens,
                                    int64_t num_rows, int64_t row_len, int64_t num_tokens,
                                    double beta, typename CreditAcc<T>::type* out,
                                    cudaStream_t stream) {
  using A = typename CreditAcc<T>::type;
  if (bad_sizes(num_rows, row_len, num_tokens, cu_seqlens)) return cudaErrorInvalidValue;
  if (num_tokens == 0 || (step_ends != nullptr && num_rows == 0)) return cudaSuccess;
  if (step_ends == nullptr) {
    implicit_token_kernel<T, M><<<elementwise_grid(num_tokens), kBlock, 0, stream>>>(
        logp, ref, mask, num_tokens, static_cast<A>(beta), out);
  } else {
    implicit_step_kernel<T, M><<<grid_for(num_rows), kBlock, 0, stream>>>(
        logp, ref, mask, step_ends, cu_seqlens, num_rows, row_len, num_tokens,
        static_cast<A>(beta), out);
  }
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE_KL(T, A, O)                                                          \
  template cudaError_t launch_kl_penalty<T, A, O>(const T*, const T*, int64_t, credit::KlKind,  \
                                                  credit::KlConvention, O*, cudaStream_t);      \
  template cudaError_t launch_kl_penalty_grad<T, A, O>(const O*, const T*, const T*, int64_t,   \
                                                       credit::KlKind, credit::KlConvention, T*, \
                                                       cudaStream_t);
FASTRL_INSTANTIATE_KL(float, float, float)
FASTRL_INSTANTIATE_KL(double, double, double)
FASTRL_INSTANTIATE_KL(__half, float, __half)
FASTRL_INSTANTIATE_KL(__nv_bfloat16, float, __nv_bfloat16)
FASTRL_INSTANTIATE_KL(double, float, float)
FASTRL_INSTANTIATE_KL(__half, float, float)
FASTRL_INSTANTIATE_KL(__nv_bfloat16, float, float)
#undef FASTRL_INSTANTIATE_KL

#define FASTRL_INSTANTIATE(T, M)                                                                \
  template cudaError_t launch_gae<T, M>(const T*, const T*, const M*, const bool*,             \
                                        const int64_t*, int64_t, int64_t, int64_t, double,      \
                                        double, credit::GaeMode, double, double,                \
                                        CreditAcc<T>::type*, CreditAcc<T>::type*,               \
                                        credit::Moments*, cudaStream_t);                        \
  template cudaError_t launch_discounted_returns<T, M>(const T*, const M*, const bool*,          \
                                                       const int64_t*, int64_t, int64_t, int64_t, \
                                                       double, ReturnsMode, double,             \
                                                       CreditAcc<T>::type*, credit::Moments*,   \
                                                       cudaStream_t);                           \
  template cudaError_t launch_masked_moments<T, M>(const T*, const M*, int64_t, credit::Moments*, \
                                                   cudaStream_t);                               \
  template cudaError_t launch_whiten<T, M>(const T*, const M*, int64_t,                        \
                                           const credit::WhitenCoefs*, T*, cudaStream_t);       \
  template cudaError_t launch_implicit_rewards<T, M>(const T*, const T*, const M*, const bool*,  \
                                                     const int64_t*, int64_t, int64_t, int64_t,  \
                                                     double, CreditAcc<T>::type*, cudaStream_t); \
  template cudaError_t launch_token_rewards<T, M>(const T*, const M*, const T*, const int64_t*, \
                                                  int64_t, int64_t, int64_t, double,            \
                                                  CreditAcc<T>::type*, cudaStream_t);           \
  template cudaError_t launch_segment_reduce<T, M>(const T*, const M*, const int64_t*, int64_t, \
                                                   int64_t, int64_t, credit::SegmentReduce,     \
                                                   CreditAcc<T>::type*, cudaStream_t);          \
  template cudaError_t launch_segment_reduce_grad<T, M>(                                        \
      const CreditAcc<T>::type*, const T*, const M*, const int64_t*, int64_t, int64_t, int64_t, \
      credit::SegmentReduce, T*, cudaStream_t);
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
