// CUDA kernels of the fused policy-loss family (see cuda/losses.cuh, fastrl/losses.h).
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>

#include "cuda/credit.cuh"  // CreditAcc
#include "cuda/losses.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

template <typename T>
using LossAcc = CreditAcc<T>;  // float, double for double

struct SumsOp {
  __device__ losses::RowSums operator()(const losses::RowSums& a, const losses::RowSums& b) const {
    return losses::row_sums_add(a, b);
  }
};
struct StatsOp {
  __device__ losses::Stats operator()(const losses::Stats& a, const losses::Stats& b) const {
    return losses::stats_merge(a, b);
  }
};
struct CountsOp {
  __device__ losses::Counts operator()(const losses::Counts& a, const losses::Counts& b) const {
    return losses::counts_add(a, b);
  }
};
struct TotalsOp {
  __device__ losses::Totals operator()(const losses::Totals& a, const losses::Totals& b) const {
    return losses::totals_add(a, b);
  }
};

// One token's inputs in the accumulation type.
template <typename A>
struct Token {
  A lp, x, adv, ref, ent, is_w;
};

template <typename T>
__device__ __forceinline__ Token<typename LossAcc<T>::type> load_token(const LossPtrs<T>& in, int64_t b, int64_t i) {
  using A = typename LossAcc<T>::type;
  Token<A> t;
  t.lp = widen(in.logp[i]);
  t.x = t.lp - static_cast<A>(widen(in.old_logp[i]));
  t.adv = widen(in.adv_per_row ? in.adv[b] : in.adv[i]);
  t.ref = in.ref ? static_cast<A>(widen(in.ref[i])) : A(0);
  t.ent = in.entropy ? static_cast<A>(widen(in.entropy[i])) : A(0);
  t.is_w = in.is_w ? static_cast<A>(widen(in.is_w[i])) : A(0);
  return t;
}

__device__ __forceinline__ void row_range(const int64_t* cu, int64_t row_len, int64_t b, int64_t* begin,
                                          int64_t* end) {
  if (cu) {
    *begin = cu[b];
    *end = cu[b + 1] > *begin ? cu[b + 1] : *begin;
  } else {
    *begin = b * row_len;
    *end = *begin + row_len;
  }
}

// The row context every thread of the block sees (first pass + block reduction).
template <typename T, typename M>
__device__ losses::RowCtx<typename LossAcc<T>::type> block_row_ctx(const LossPtrs<T>& in, const M* mask,
                                                                   const losses::Params& p, int64_t b,
                                                                   int64_t begin, int64_t end) {
  using A = typename LossAcc<T>::type;
  using Reduce = cub::BlockReduce<losses::RowSums, kLossBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ losses::RowCtx<A> ctx;
  losses::RowSums local = losses::row_sums_zero();
  if (!losses::needs_row_pass(p)) return losses::row_ctx<A>(p, local, false);  // count from the token pass
  for (int64_t i = begin + threadIdx.x; i < end; i += kLossBlock) {
    if (!is_valid(mask[i])) continue;
    const Token<A> t = load_token(in, b, i);
    local = losses::row_sums_add(local, losses::row_sums_token(p, t.x, t.adv, in.is_w ? double(t.is_w) : -1.0));
  }
  const losses::RowSums total = Reduce(tmp).Reduce(local, SumsOp());
  if (threadIdx.x == 0) ctx = losses::row_ctx<A>(p, total, in.is_w != nullptr);
  __syncthreads();
  return ctx;
}

// Row b: each token's derivatives, and the row's statistics (written by thread 0).
template <typename T, typename M, typename A>
__device__ void loss_row(const LossPtrs<T>& in, const M* mask, const int64_t* cu, int64_t row_len,
                         const losses::Params& p, int64_t b, double* stats, A* dpol, A* daux) {
  using Reduce = cub::BlockReduce<losses::Stats, kLossBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  int64_t begin, end;
  row_range(cu, row_len, b, &begin, &end);
  const losses::RowCtx<A> ctx = block_row_ctx(in, mask, p, b, begin, end);
  losses::Stats s = losses::stats_zero();
  for (int64_t i = begin + threadIdx.x; i < end; i += kLossBlock) {
    double dp = 0.0, da = 0.0;
    if (is_valid(mask[i])) {
      const Token<A> t = load_token(in, b, i);
      const A* ref = in.ref ? &t.ref : nullptr;
      losses::stats_token(p, ctx, t.lp, t.x, t.adv, ref, in.entropy ? &t.ent : nullptr, in.is_w ? &t.is_w : nullptr,
                          losses::token_exps(p, t.lp, t.x, ref), &s, &dp, &da);
    }
    dpol[i] = static_cast<A>(dp);
    if (daux) daux[i] = static_cast<A>(da);
  }
  losses::Stats total = Reduce(tmp).Reduce(s, StatsOp());
  if (threadIdx.x == 0) {
    losses::stats_finish(p, ctx, &total);
    for (int k = 0; k < losses::kNumStats; ++k) stats[b * losses::kNumStats + k] = total.v[k];
  }
}

// The finish, by one block: thread k walks rows k, k + kLossBlock, ... (the counts pass, then the
// weighted sums), cub reductions in a fixed tree; thread 0 writes the loss and the metrics. The
// same operations whichever block runs it, so the result is bitwise reproducible.
__device__ void loss_finish(double* stats, int64_t num_rows, const losses::FinishParams& f,
                            const double* counts, void* loss, bool loss_double, float* metrics) {
  using CountsReduce = cub::BlockReduce<losses::Counts, kLossBlock>;
  using TotalsReduce = cub::BlockReduce<losses::Totals, kLossBlock>;
  __shared__ union {
    typename CountsReduce::TempStorage counts;
    typename TotalsReduce::TempStorage totals;
  } tmp;
  __shared__ losses::Counts total_counts;
  losses::Counts c = losses::counts_zero();
  for (int64_t b = threadIdx.x; b < num_rows; b += kLossBlock) {
    c = losses::counts_add(c, losses::counts_row(stats + b * losses::kNumStats));
  }
  c = CountsReduce(tmp.counts).Reduce(c, CountsOp());
  if (threadIdx.x == 0) total_counts = c;
  __syncthreads();  // also ends the use of tmp.counts
  const losses::AggCounts agg = losses::agg_counts(f, total_counts, counts, num_rows);
  losses::Totals t = losses::totals_zero();
  for (int64_t b = threadIdx.x; b < num_rows; b += kLossBlock) {
    t = losses::totals_add(t, losses::totals_row(f, agg, stats + b * losses::kNumStats));
  }
  t = TotalsReduce(tmp.totals).Reduce(t, TotalsOp());
  if (threadIdx.x == 0) {
    const double value = losses::finish(f, agg, t, metrics);
    if (loss_double) {
      *static_cast<double*>(loss) = value;
    } else {
      *static_cast<float*>(loss) = static_cast<float>(value);
    }
  }
}

// The forward in one launch: block b runs row b, then the last block to finish its row runs the
// finish. Each block's thread 0 fences its row's statistics before it takes a ticket, so the block
// that draws the last ticket sees every row (the threadFenceReduction pattern); *done must be 0 at
// launch. One block when there is no row (a zero loss and metrics).
template <typename T, typename M, typename A>
__global__ void __launch_bounds__(kLossBlock)
    loss_kernel(LossPtrs<T> in, const M* mask, const int64_t* cu, int64_t num_rows, int64_t row_len,
                losses::Params p, losses::FinishParams f, const double* counts, double* stats, A* dpol,
                A* daux, void* loss, bool loss_double, float* metrics, unsigned* done) {
  if (static_cast<int64_t>(blockIdx.x) < num_rows) {
    loss_row(in, mask, cu, row_len, p, static_cast<int64_t>(blockIdx.x), stats, dpol, daux);
  }
  __shared__ bool last;
  if (threadIdx.x == 0) {
    __threadfence();  // this row's statistics, before the ticket
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // every row's statistics, after the ticket
  loss_finish(stats, num_rows, f, counts, loss, loss_double, metrics);
}

template <typename M, typename A>
__global__ void __launch_bounds__(kLossBlock)
    rows_grad_kernel(const M* mask, const int64_t* cu, int64_t row_len, const void* grad, bool grad_double,
                     double scale, const double* stats, const A* dpol, const A* daux, double entropy_coef,
                     A* grad_logp, A* grad_entropy) {
  const int64_t b = blockIdx.x;
  int64_t begin, end;
  row_range(cu, row_len, b, &begin, &end);
  const double g = (grad_double ? *static_cast<const double*>(grad)
                                : static_cast<double>(*static_cast<const float*>(grad))) * scale;
  const losses::RowGrad r = losses::row_grad(g, stats, b);
  const A g_ent = static_cast<A>(-entropy_coef * r.g_aux);
  for (int64_t i = begin + threadIdx.x; i < end; i += kLossBlock) {
    const bool valid = is_valid(mask[i]);
    const double da = daux ? static_cast<double>(daux[i]) : 0.0;
    grad_logp[i] = valid ? static_cast<A>(losses::token_grad(r, dpol[i], da)) : A(0);
    if (grad_entropy) grad_entropy[i] = valid ? g_ent : A(0);
  }
}

}  // namespace

template <typename T, typename M, typename A>
cudaError_t launch_policy_loss(LossPtrs<T> in, const M* mask, const int64_t* cu_seqlens, int64_t num_rows,
                               int64_t row_len, const losses::Params& p, const losses::FinishParams& f,
                               const double* counts, double* stats, A* dpol, A* daux, void* loss, bool loss_double,
                               float* metrics, unsigned* done, cudaStream_t stream) {
  if (num_rows < 0 || num_rows > 0x7fffffff || row_len < 0) return cudaErrorInvalidValue;
  const cudaError_t err = cudaMemsetAsync(done, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  const unsigned blocks = num_rows > 0 ? static_cast<unsigned>(num_rows) : 1u;
  loss_kernel<T, M, A><<<blocks, kLossBlock, 0, stream>>>(in, mask, cu_seqlens, num_rows, row_len, p, f, counts,
                                                          stats, dpol, daux, loss, loss_double, metrics, done);
  return cudaGetLastError();
}

template <typename M, typename A>
cudaError_t launch_policy_loss_rows_grad(const M* mask, const int64_t* cu_seqlens, int64_t num_rows, int64_t row_len,
                                         const void* grad, bool grad_double, double scale, const double* stats,
                                         const A* dpol, const A* daux, double entropy_coef, A* grad_logp,
                                         A* grad_entropy, cudaStream_t stream) {
  if (num_rows < 0 || num_rows > 0x7fffffff || row_len < 0) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  rows_grad_kernel<M, A><<<static_cast<unsigned>(num_rows), kLossBlock, 0, stream>>>(
      mask, cu_seqlens, row_len, grad, grad_double, scale, stats, dpol, daux, entropy_coef, grad_logp, grad_entropy);
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE_LOSS(T, M)                                                                        \
  template cudaError_t launch_policy_loss<T, M, LossAcc<T>::type>(                                            \
      LossPtrs<T>, const M*, const int64_t*, int64_t, int64_t, const losses::Params&,                        \
      const losses::FinishParams&, const double*, double*, LossAcc<T>::type*, LossAcc<T>::type*, void*, bool, \
      float*, unsigned*, cudaStream_t);
#define FASTRL_INSTANTIATE_LOSS_MASKS(T) \
  FASTRL_INSTANTIATE_LOSS(T, bool)       \
  FASTRL_INSTANTIATE_LOSS(T, uint8_t)    \
  FASTRL_INSTANTIATE_LOSS(T, int32_t)    \
  FASTRL_INSTANTIATE_LOSS(T, int64_t)    \
  FASTRL_INSTANTIATE_LOSS(T, float)      \
  FASTRL_INSTANTIATE_LOSS(T, double)
FASTRL_INSTANTIATE_LOSS_MASKS(float)
FASTRL_INSTANTIATE_LOSS_MASKS(double)
FASTRL_INSTANTIATE_LOSS_MASKS(__half)
FASTRL_INSTANTIATE_LOSS_MASKS(__nv_bfloat16)
#undef FASTRL_INSTANTIATE_LOSS_MASKS
#undef FASTRL_INSTANTIATE_LOSS

#define FASTRL_INSTANTIATE_GRAD(M)                                                                            \
  template cudaError_t launch_policy_loss_rows_grad<M, float>(const M*, const int64_t*, int64_t, int64_t,     \
                                                              const void*, bool, double, const double*,       \
                                                              const float*, const float*, double, float*,     \
                                                              float*, cudaStream_t);                          \
  template cudaError_t launch_policy_loss_rows_grad<M, double>(const M*, const int64_t*, int64_t, int64_t,    \
                                                               const void*, bool, double, const double*,      \
                                                               const double*, const double*, double, double*, \
                                                               double*, cudaStream_t);
FASTRL_INSTANTIATE_GRAD(bool)
FASTRL_INSTANTIATE_GRAD(uint8_t)
FASTRL_INSTANTIATE_GRAD(int32_t)
FASTRL_INSTANTIATE_GRAD(int64_t)
FASTRL_INSTANTIATE_GRAD(float)
FASTRL_INSTANTIATE_GRAD(double)
#undef FASTRL_INSTANTIATE_GRAD

}  // namespace cuda
}  // namespace fastrl
