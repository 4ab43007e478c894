// CPU kernels of the fused policy-loss family (see cpu/losses.h, fastrl/losses.h).
//
// Rows in parallel (at::parallel_for); each row is walked by one thread: a first pass for the
// row-level quantities some kinds need (sequence ratio, GMPO means), then one pass over its tokens
// that accumulates every statistic in fp64 in token order and writes each token's derivatives.
// The backward scales those by the row's incoming gradients: one streaming pass.
//
// The token pass goes in blocks of kBlock tokens: the block's exps (the ratio's and the KL
// estimator's, the bulk of the arithmetic) are taken first in SIMD lanes (cpu/simd.h: the same
// bits on every ISA), then the scalar header math (fastrl/losses.h) runs on each token with them.
// fp64 inputs take libm's exp inline instead.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // selects -> vector blends (see cpu/simd.h)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/losses.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace fastrl {
namespace cpu {
namespace {

// 1 / 0 for a 0/1 mask value, -1 for anything else (NaN included).
template <typename mask_t>
inline int valid_bit(mask_t m) {
  const double x = static_cast<double>(m);
  return x == 1.0 ? 1 : (x == 0.0 ? 0 : -1);
}
template <>
inline int valid_bit<bool>(bool m) {
  return m ? 1 : 0;
}

inline void keep_min(std::atomic<int64_t>& bad, int64_t i) {
  int64_t cur = bad.load();
  while ((cur < 0 || i < cur) && !bad.compare_exchange_weak(cur, i)) {
  }
}

constexpr int64_t kBlock = 256;  // tokens per block of exps (a multiple of every lane width)

// buf[i] = exp(buf[i]) for i < n rounded up to the lane width (buf holds kBlock floats).
template <typename V>
FASTRL_CPU_INLINE void exp_block(float* buf, int64_t n) {
  constexpr int64_t kW = simd::LaneTraits<V>::kWidth;
  for (int64_t i = 0; i < n; i += kW) simd::store_lanes(buf + i, simd::fast_exp(simd::load_lanes<V>(buf + i)));
}

template <typename scalar_t, typename mask_t, typename acc_t>
class RowKernel {
 public:
  RowKernel(const LossInputs<scalar_t, mask_t>& in, Rows rows, const losses::Params& p) : in_(in), rows_(rows), p_(p) {}

  // One row; returns its smallest bad mask index or -1. V: the lane type of the exps.
  template <typename V>
  FASTRL_CPU_INLINE int64_t forward(int64_t b, double* out, acc_t* dpol, acc_t* daux) const {
    constexpr bool kSimdExp = std::is_same<acc_t, float>::value;
    alignas(64) float e_ratio[kBlock] = {}, e_kl[kBlock] = {};
    // A local copy: the compiler can then keep the parameters in registers and hoist the
    // per-token tests on them (kind, clip bounds, ...) out of the loop.
    const losses::Params p = p_;
    losses::RowCtx<acc_t> ctx;
    int64_t bad = row_ctx(b, &ctx);
    losses::Stats s = losses::stats_zero();
    for (int64_t i0 = begin(b), e = end(b); i0 < e; i0 += kBlock) {
      const int64_t n = std::min(kBlock, e - i0);
      if constexpr (kSimdExp) block_exps<V>(i0, n, e_ratio, e_kl);
      for (int64_t i = i0; i < i0 + n; ++i) {
        const int bit = valid_bit(in_.mask[i]);
        double dp = 0.0, da = 0.0;
        if (bit == 1) {
          const Token tok = token(b, i);
          losses::TokenExps<acc_t> ex;
          if constexpr (kSimdExp) {
            ex = {e_ratio[i - i0], e_kl[i - i0]};
          } else {
            ex = losses::token_exps(p, tok.lp, tok.x, tok.ref_p());
          }
          losses::stats_token(p, ctx, tok.lp, tok.x, tok.adv, tok.ref_p(), tok.ent_p(), tok.is_w_p(), ex, &s, &dp,
                              &da);
        } else if (bit < 0 && bad < 0) {
          bad = i;
        }
        dpol[i] = static_cast<acc_t>(dp);
        if (daux) daux[i] = static_cast<acc_t>(da);
      }
    }
    losses::stats_finish(p, ctx, &s);
    for (int k = 0; k < losses::kNumStats; ++k) out[k] = s.v[k];
    return bad;
  }

 private:
  struct Token {
    acc_t lp, x, adv, ref, ent, is_w;
    bool has_ref, has_ent, has_is_w;
    const acc_t* ref_p() const { return has_ref ? &ref : nullptr; }
    const acc_t* ent_p() const { return has_ent ? &ent : nullptr; }
    const acc_t* is_w_p() const { return has_is_w ? &is_w : nullptr; }
  };

  FASTRL_CPU_INLINE Token token(int64_t b, int64_t i) const {
    Token t;
    t.lp = static_cast<acc_t>(in_.logp[i]);
    t.x = log_ratio(i);
    t.adv = static_cast<acc_t>(in_.adv_per_row ? in_.adv[b] : in_.adv[i]);
    t.has_ref = in_.ref != nullptr;
    t.has_ent = in_.entropy != nullptr;
    t.has_is_w = in_.is_w != nullptr;
    t.ref = t.has_ref ? static_cast<acc_t>(in_.ref[i]) : acc_t(0);
    t.ent = t.has_ent ? static_cast<acc_t>(in_.entropy[i]) : acc_t(0);
    t.is_w = t.has_is_w ? static_cast<acc_t>(in_.is_w[i]) : acc_t(0);
    return t;
  }

  // The exps of tokens [i0, i0 + n) of row b (masked tokens included: their values go unused),
  // as losses::token_exps computes them but with simd::fast_exp.
  template <typename V>
  FASTRL_CPU_INLINE void block_exps(int64_t i0, int64_t n, float* e_ratio, float* e_kl) const {
    if (losses::ratio_uses_exp(p_)) {
      for (int64_t k = 0; k < n; ++k) e_ratio[k] = losses::ratio_exp_arg(p_, log_ratio(i0 + k));
      exp_block<V>(e_ratio, n);
    }
    if (in_.ref != nullptr && losses::kl_uses_exp(p_.kl)) {
      for (int64_t k = 0; k < n; ++k) {
        e_kl[k] = losses::kl_exp_arg(p_.kl, static_cast<float>(in_.logp[i0 + k]), static_cast<float>(in_.ref[i0 + k]));
      }
      exp_block<V>(e_kl, n);
    }
  }

  FASTRL_CPU_INLINE acc_t log_ratio(int64_t i) const { return static_cast<acc_t>(in_.logp[i]) - static_cast<acc_t>(in_.old_logp[i]); }

  int64_t begin(int64_t b) const { return rows_.cu_seqlens ? rows_.cu_seqlens[b] : b * rows_.row_len; }
  int64_t end(int64_t b) const { return rows_.cu_seqlens ? rows_.cu_seqlens[b + 1] : (b + 1) * rows_.row_len; }

  // The first pass, for the kinds that need row sums (others get RowCtx defaults: their row
  // count comes from the token pass); also finds bad mask values.
  FASTRL_CPU_INLINE int64_t row_ctx(int64_t b, losses::RowCtx<acc_t>* ctx) const {
    int64_t bad = -1;
    losses::RowSums sums = losses::row_sums_zero();
    for (int64_t i = begin(b), e = losses::needs_row_pass(p_) ? end(b) : begin(b); i < e; ++i) {
      const int bit = valid_bit(in_.mask[i]);
      if (bit < 0 && bad < 0) bad = i;
      if (bit != 1) continue;
      const Token tok = token(b, i);
      sums = losses::row_sums_add(
          sums, losses::row_sums_token(p_, tok.x, tok.adv, tok.has_is_w ? static_cast<double>(in_.is_w[i]) : -1.0));
    }
    *ctx = losses::row_ctx<acc_t>(p_, sums, in_.is_w != nullptr);
    return bad;
  }

  const LossInputs<scalar_t, mask_t>& in_;
  Rows rows_;
  const losses::Params& p_;
};

// Grain of the row loop: about 32k tokens per task.
inline int64_t grain(const Rows& rows) {
  const int64_t n = rows.cu_seqlens ? rows.cu_seqlens[rows.num_rows] : rows.num_rows * rows.row_len;
  const int64_t avg = rows.num_rows > 0 ? std::max<int64_t>(1, n / rows.num_rows) : 1;
  return std::max<int64_t>(1, (int64_t{1} << 15) / avg);
}

// Rows [b0, b1), compiled per ISA (the whole token pass: the scalar math gains the wider ISAs'
// registers, the exps their lanes; the same bits on every ISA).
template <typename V, typename scalar_t, typename mask_t, typename acc_t>
FASTRL_CPU_INLINE void forward_rows(const RowKernel<scalar_t, mask_t, acc_t>* k, int64_t b0, int64_t b1,
                                    double* stats, acc_t* dpol, acc_t* daux, std::atomic<int64_t>* bad) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t rb = k->template forward<V>(b, stats + b * losses::kNumStats, dpol, daux);
    if (rb >= 0) keep_min(*bad, rb);
  }
}
FASTRL_CPU_ISA_VARIANTS(forward_rows)

template <typename load_t, typename acc_t>
struct GradArgs {
  const load_t* mask;
  Rows rows;
  double g;
  const double* stats;
  const acc_t *dpol, *daux;
  double entropy_coef;
  acc_t *grad_logp, *grad_entropy;
};

// The backward's token loop of one row: branch-free (selects), the inputs' presence fixed at compile
// time, so that GCC vectorizes it for the wrapper's ISA (fp64 token_grad in lanes, same bits).
template <bool kAux, bool kEntropy, typename load_t, typename acc_t>
FASTRL_CPU_INLINE void grad_tokens(const GradArgs<load_t, acc_t>& a, const losses::RowGrad& r, acc_t g_ent,
                                   int64_t begin, int64_t end) {
  const load_t* __restrict mask = a.mask;
  const acc_t* __restrict dpol = a.dpol;
  const acc_t* __restrict daux = a.daux;
  acc_t* __restrict grad_logp = a.grad_logp;
  acc_t* __restrict grad_entropy = a.grad_entropy;
  for (int64_t i = begin; i < end; ++i) {
    const bool valid = valid_bit(mask[i]) == 1;
    const double da = kAux ? static_cast<double>(daux[i]) : 0.0;
    const acc_t g = static_cast<acc_t>(losses::token_grad(r, dpol[i], da));
    grad_logp[i] = valid ? g : acc_t(0);
    if (kEntropy) grad_entropy[i] = valid ? g_ent : acc_t(0);
  }
}

template <typename V, typename load_t, typename acc_t>
FASTRL_CPU_INLINE void backward_rows(const GradArgs<load_t, acc_t>* a, int64_t b0, int64_t b1) {
  const Rows& rows = a->rows;
  for (int64_t b = b0; b < b1; ++b) {
    const losses::RowGrad r = losses::row_grad(a->g, a->stats, b);
    const acc_t g_ent = static_cast<acc_t>(-a->entropy_coef * r.g_aux);
    const int64_t begin = rows.cu_seqlens ? rows.cu_seqlens[b] : b * rows.row_len;
    const int64_t end = rows.cu_seqlens ? rows.cu_seqlens[b + 1] : (b + 1) * rows.row_len;
    if (a->daux) {
      a->grad_entropy ? grad_tokens<true, true>(*a, r, g_ent, begin, end)
                      : grad_tokens<true, false>(*a, r, g_ent, begin, end);
    } else {
      a->grad_entropy ? grad_tokens<false, true>(*a, r, g_ent, begin, end)
                      : grad_tokens<false, false>(*a, r, g_ent, begin, end);
    }
  }
}
FASTRL_CPU_ISA_VARIANTS(backward_rows)

}  // namespace

template <typename scalar_t, typename mask_t, typename acc_t>
int64_t policy_loss_rows(const LossInputs<scalar_t, mask_t>& in, Rows rows, const losses::Params& p,
                         double* stats, acc_t* dpol, acc_t* daux) {
  const RowKernel<scalar_t, mask_t, acc_t> k(in, rows, p);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, grain(rows), [&](int64_t b0, int64_t b1) {
    FASTRL_CPU_ISA_CALL(forward_rows, &k, b0, b1, stats, dpol, daux, &bad);
  });
  return bad.load();
}

double policy_loss_finish(double* stats, int64_t num_rows, const losses::FinishParams& f, const double* counts,
                          float* metrics) {
  losses::Counts c = losses::counts_zero();
  for (int64_t b = 0; b < num_rows; ++b) c = losses::counts_add(c, losses::counts_row(stats + b * losses::kNumStats));
  const losses::AggCounts agg = losses::agg_counts(f, c, counts, num_rows);
  losses::Totals t = losses::totals_zero();
  for (int64_t b = 0; b < num_rows; ++b) {
    t = losses::totals_add(t, losses::totals_row(f, agg, stats + b * losses::kNumStats));
  }
  return losses::finish(f, agg, t, metrics);
}

template <typename mask_t, typename acc_t>
void policy_loss_rows_grad(const mask_t* mask, Rows rows, double g, const double* stats, const acc_t* dpol,
                           const acc_t* daux, double entropy_coef, acc_t* grad_logp, acc_t* grad_entropy) {
  // A bool mask is read as its bytes (0 / 1): GCC does not vectorize loads of bool.
  using load_t = std::conditional_t<std::is_same<mask_t, bool>::value, uint8_t, mask_t>;
  const GradArgs<load_t, acc_t> a{reinterpret_cast<const load_t*>(mask), rows, g, stats, dpol, daux,
                                  entropy_coef, grad_logp, grad_entropy};
  at::parallel_for(0, rows.num_rows, grain(rows), [&](int64_t b0, int64_t b1) {
    FASTRL_CPU_ISA_CALL(backward_rows, &a, b0, b1);
  });
}

#define FASTRL_INSTANTIATE_LOSS(T, M, A)                                                              \
  template int64_t policy_loss_rows<T, M, A>(const LossInputs<T, M>&, Rows, const losses::Params&,   \
                                             double*, A*, A*);
#define FASTRL_INSTANTIATE_LOSS_MASKS(T, A) \
  FASTRL_INSTANTIATE_LOSS(T, bool, A)       \
  FASTRL_INSTANTIATE_LOSS(T, uint8_t, A)    \
  FASTRL_INSTANTIATE_LOSS(T, int32_t, A)    \
  FASTRL_INSTANTIATE_LOSS(T, int64_t, A)    \
  FASTRL_INSTANTIATE_LOSS(T, float, A)      \
  FASTRL_INSTANTIATE_LOSS(T, double, A)
FASTRL_INSTANTIATE_LOSS_MASKS(float, float)
FASTRL_INSTANTIATE_LOSS_MASKS(double, double)
FASTRL_INSTANTIATE_LOSS_MASKS(c10::Half, float)
FASTRL_INSTANTIATE_LOSS_MASKS(c10::BFloat16, float)
#undef FASTRL_INSTANTIATE_LOSS_MASKS
#undef FASTRL_INSTANTIATE_LOSS

#define FASTRL_INSTANTIATE_GRAD(M)                                                                        \
  template void policy_loss_rows_grad<M, float>(const M*, Rows, double, const double*, const float*,          \
                                                const float*, double, float*, float*);                     \
  template void policy_loss_rows_grad<M, double>(const M*, Rows, double, const double*, const double*,        \
                                                 const double*, double, double*, double*);
FASTRL_INSTANTIATE_GRAD(bool)
FASTRL_INSTANTIATE_GRAD(uint8_t)
FASTRL_INSTANTIATE_GRAD(int32_t)
FASTRL_INSTANTIATE_GRAD(int64_t)
FASTRL_INSTANTIATE_GRAD(float)
FASTRL_INSTANTIATE_GRAD(double)
#undef FASTRL_INSTANTIATE_GRAD

}  // namespace cpu
}  // namespace fastrl
