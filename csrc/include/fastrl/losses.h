// Policy-loss math shared by the CPU and CUDA kernels of the fused loss family (fastrl.losses).
//
// A row b (one response) of valid tokens t (mask 1) produces the statistics of RowStat below;
// the loss is a fixed linear combination of the rows' kPolicy / kAux sums chosen by the
// aggregation mode (finish_* below: one small reduction over the rows that also yields every
// metric), so the kernels only need, per token:
//
//   x_t = logp_t - old_logp_t                                   (log-ratio)
//   r_t = exp(clamp(x_t, -c, c))  token level (c = log_clamp; verl 20, none for TRL)
//       = exp(min(mean_b x, 10))  kind gspo (verl: stop-gradient sequence ratio)
//       = exp(clamp(mean_b x))    ratio_level sequence (TRL: gradient through the mean)
//   pg_t = kind's per-token policy loss of (A_t, r_t, logp_t)   (times is_weights_t)
//   aux_t = kl_coef * KL(logp_t, ref_t) - entropy_coef * H_t
//
// and for the backward, d pg_t / d r_t, d pg_t / d logp_t (direct term), d aux_t / d logp_t. The
// forward pass writes each token's derivatives (dpol_t, daux_t) and the row's backward coefficients
// (mul_b, add_b, and the aggregation weights of its policy / aux sums), so the backward is one
// streaming pass from the loss's incoming gradient: grad_t = g_pol_b (dpol_t mul_b + add_b) + g_aux_b daux_t.
// Gradients follow torch's rules for the trainers' expressions: clamp passes the gradient where
// lo <= x <= hi, max/min split it in half on ties, torch.where routes it to the chosen branch.
// geo_mean (GMPO) is a sequence-level loss (one value per row) handled by geo_* below.
#pragma once

#include "fastrl/common.h"
#include "fastrl/credit.h"

namespace fastrl {
namespace losses {

enum class Kind : int32_t { kVanilla = 0, kGpg = 1, kCispo = 2, kGspo = 3, kSapo = 4, kGeoMean = 5 };
enum class RatioLevel : int32_t { kToken = 0, kSequence = 1 };
// verl's estimators (credit.h) plus TRL's k3 without clamps.
enum class KlMode : int32_t { kNone = -1, kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3, kK3Trl = 4 };
// The aggregation modes of fastrl.losses.policy_loss (verl's bnpo is kTokenMean).
enum class Agg : int32_t {
  kTokenMean = 0,
  kTokenSum = 1,
  kSeqMeanTokenSum = 2,
  kSeqMeanTokenSumNorm = 3,
  kSeqMeanTokenMean = 4,
  kGrpo = 5,
  kDrGrpo = 6,
  kLuspo = 7,
};

// Columns of the per-row statistics (fp64, [B, kNumStats]).
enum RowStat : int {
  kCount = 0,        // valid tokens n_b
  kPolicy = 1,       // sum_t pg_t (geo_mean: the row's loss)
  kAux = 2,          // sum_t aux_t
  kClip = 3,         // verl pg_clipfrac numerator (kind-specific)
  kClipLower = 4,    // verl pg_clipfrac_lower numerator (dual-clip active; geo_mean: A < 0)
  kLowRegion = 5,    // TRL clip_ratio/low: r < 1 - clip_low and A < 0
  kHighRegion = 6,   // TRL clip_ratio/high: r > 1 + clip_high and A > 0
  kNegLogRatio = 7,  // sum_t -x_t (approx KL; x clamped as the kind clamps it)
  kRatioSum = 8,
  kRatioMin = 9,     // +inf for an empty row
  kRatioMax = 10,    // -inf for an empty row
  kEntropySum = 11,
  kKlSum = 12,
  // backward coefficients of the row: d loss_row / d logp_t = g_pol (dpol_t * kRowMul + kRowAdd)
  // at valid tokens (geo_mean: the row factor; TRL sequence level: the term through the mean)
  kRowMul = 13,
  kRowAdd = 14,
  // written by the finish: the row's aggregation weight w_b (of its kAux sum, and of its kPolicy
  // sum unless kPolicyDiv > 0: geo_mean's rows-mean divides the kPolicy sum by max(B, 1))
  kWeight = 15,
  kPolicyDiv = 16,
  kNumStats = 17,
};

struct Params {
  Kind kind;
  RatioLevel level;
  double clip_low, clip_high;  // as given (GMPO clamps the log-ratio to [-clip_low, clip_high])
  double clip_lo, clip_hi;    // ratio bounds 1 - clip_low, 1 + clip_high (fp64, as Python computes them)
  double dual_clip;         // <= 0: none
  double log_clamp;         // <= 0: none
  double delta;             // TRL two-sided clip of the unclipped branch; <= 0: none
  double tau_pos, tau_neg;  // SAPO
  double kl_coef, entropy_coef;
  KlMode kl;
};

using credit::exp_acc;

// torch.maximum(a, b)'s value and gradient given da, db (half each on a tie).
template <typename A>
FASTRL_HOST_DEVICE_HOT A max_grad(A a, A b, A da, A db) {
  return a > b ? da : (a < b ? db : A(0.5) * (da + db));
}

struct TokenTerms {
  double pg;     // policy loss of the token (before is_weights)
  double d_r;    // d pg / d r
  double d_lp;   // d pg / d logp through logp itself (gpg, cispo)
  bool clip, clip_lower;
};

// The per-token policy loss of `kind` at ratio r (already computed) in the accumulation type A
// (float for fp32/bf16/fp16 inputs, double for fp64), with the trainers' operation order.
template <typename A>
FASTRL_HOST_DEVICE_HOT TokenTerms token_terms(const Params& p, A adv, A r, A logp) {
  TokenTerms o{0.0, 0.0, 0.0, false, false};
  const A neg_adv = -adv;
  switch (p.kind) {
    case Kind::kGpg: {  // verl: -log_prob * advantages
      o.pg = -logp * adv;
      o.d_lp = neg_adv;
      break;
    }
    case Kind::kCispo: {  // -sg(clamp(r, lo, hi)) * A * logp
      const A c = credit::clamp_nan(r, A(p.clip_lo), A(p.clip_hi));
      o.pg = credit::mul_rn(-c * adv, logp);
      o.d_lp = -c * adv;
      o.clip = r != c;
      break;
    }
    case Kind::kSapo: {  // -(sigmoid(tau (r - 1)) * 4 / tau) * A
      const A tau = adv > A(0) ? A(p.tau_pos) : A(p.tau_neg);
      const A s = A(1) / (A(1) + exp_acc(-(tau * (r - A(1)))));
      const A gate = s * (A(4) / tau);
      o.pg = -gate * adv;
      o.d_r = static_cast<double>(neg_adv) * (static_cast<double>(s) * (1.0 - s) * 4.0);
      break;
    }
    default: {  // vanilla / gspo: max(-A r', -A clamp(r, lo, hi)), r' = min(r, delta) (TRL)
      // Written as selects and non-short-circuit & on bools, not branches: the advantage's sign and
      // the clip region are random per token, so branches would mispredict (the op's hot path).
      const bool cut = (p.delta > 0.0 && p.kind == Kind::kVanilla) & (r > A(p.delta));
      const A r1 = cut ? A(p.delta) : r;
      const A c = credit::clamp_nan(r, A(p.clip_lo), A(p.clip_hi));
      const A l1 = neg_adv * r1, l2 = neg_adv * c;
      const A d1 = cut ? A(0) : neg_adv;
      const A d2 = credit::in_range(r, A(p.clip_lo), A(p.clip_hi)) ? neg_adv : A(0);
      A pg = l1 > l2 ? l1 : l2;                  // torch.maximum ...
      pg = l1 != l1 ? l1 : (l2 != l2 ? l2 : pg);  // ... propagates a NaN
      A d = max_grad(l1, l2, d1, d2);
      o.clip = l2 > l1;
      // dual clip where A < 0: min(-A * c3, pg), torch.minimum's gradient rule
      const bool dual = (p.dual_clip > 0.0 && p.kind == Kind::kVanilla) & (adv < A(0));
      const A l3 = neg_adv * A(p.dual_clip);
      o.clip_lower = dual & (pg > l3);
      const A dd = pg < l3 ? d : (pg > l3 ? A(0) : A(0.5) * d);
      o.pg = static_cast<double>(o.clip_lower ? l3 : pg);
      o.d_r = static_cast<double>(dual ? dd : d);
      break;
    }
  }
  return o;
}

// The log-ratio fed to exp at token level, and whether its clamp passes the gradient.
template <typename A>
FASTRL_HOST_DEVICE_HOT A clamp_log_ratio(A x, double log_clamp) {
  return log_clamp > 0.0 ? credit::clamp_nan(x, A(-log_clamp), A(log_clamp)) : x;
}
template <typename A>
FASTRL_HOST_DEVICE_HOT bool log_ratio_passes(A x, double log_clamp) {
  return log_clamp > 0.0 ? credit::in_range(x, A(-log_clamp), A(log_clamp)) : true;
}

// The KL estimators that take an exp, and the argument of that exp (one per token; the CPU kernel
// computes a block's exps in SIMD lanes first, the CUDA kernel inline).
FASTRL_HOST_DEVICE_HOT bool kl_uses_exp(KlMode mode) { return mode == KlMode::kK3 || mode == KlMode::kK3Trl; }
template <typename A>
FASTRL_HOST_DEVICE_HOT A kl_exp_arg(KlMode mode, A logp, A ref) {
  return mode == KlMode::kK3 ? credit::k3_exp_arg<credit::KlConvention::kVerl>(logp, ref) : ref - logp;
}

// The KL estimator's value at (logp, ref) and its derivative in logp (*grad), given
// e = exp(kl_exp_arg(mode, logp, ref)) (ignored by the estimators without exp):
// credit::kl_value / kl_grad for verl's estimators, TRL's exp(ref - logp) - (ref - logp) - 1.
template <typename A>
FASTRL_HOST_DEVICE_HOT A kl_term(KlMode mode, A logp, A ref, A e, A* grad) {
  using credit::KlConvention;
  using credit::KlKind;
  switch (mode) {
    case KlMode::kK1:
      *grad = credit::kl_grad<KlKind::kK1, KlConvention::kVerl>(logp, ref);
      return credit::kl_value<KlKind::kK1, KlConvention::kVerl>(logp, ref);
    case KlMode::kAbs:
      *grad = credit::kl_grad<KlKind::kAbs, KlConvention::kVerl>(logp, ref);
      return credit::kl_value<KlKind::kAbs, KlConvention::kVerl>(logp, ref);
    case KlMode::kK2:
      *grad = credit::kl_grad<KlKind::kK2, KlConvention::kVerl>(logp, ref);
      return credit::kl_value<KlKind::kK2, KlConvention::kVerl>(logp, ref);
    case KlMode::kK3:  // credit::kl_value / kl_grad<kK3, kVerl>, sharing the exp
      *grad = credit::k3_grad_e<KlConvention::kVerl>(logp, ref, e);
      return credit::k3_value_e<KlConvention::kVerl>(logp, ref, e);
    case KlMode::kK3Trl: {
      const A d = ref - logp;
      *grad = A(1) - e;
      return (e - d) - A(1);
    }
    default:
      *grad = A(0);
      return A(0);
  }
}

// ------------------------------------------------------------------------------- geo_mean (GMPO)
// verl compute_policy_loss_geo_mean: with s = sign(A_t), xc = clamp(x, -clip_low, clip_high),
//   xm_t = s * min(s * x, s * xc)          (the clipped side of the log-ratio, per advantage sign)
//   loss_b = -mean_t(A_t) * exp(mean_t xm_t) * w_b     w_b = exp(mean_t log(is_w_t + 1e-10)) or 1
// (means over the row's valid tokens, 0 for an empty row), and d xm / d x = [s != 0 and s x <= s xc].
template <typename A>
FASTRL_HOST_DEVICE_HOT A geo_clipped(A x, A adv, double clip_low, double clip_high) {
  const A s = adv > A(0) ? A(1) : (adv < A(0) ? A(-1) : A(0));
  const A xc = credit::clamp_nan(x, A(-clip_low), A(clip_high));
  const A a = s * x, b = s * xc;
  return s * (a < b ? a : b);
}
template <typename A>
FASTRL_HOST_DEVICE_HOT A geo_clipped_grad(A x, A adv, double clip_low, double clip_high) {
  const A s = adv > A(0) ? A(1) : (adv < A(0) ? A(-1) : A(0));
  const A xc = credit::clamp_nan(x, A(-clip_low), A(clip_high));
  return (s != A(0) && s * x <= s * xc) ? A(1) : A(0);
}

// ----------------------------------------------------------------------------------- row passes
// One row = a first pass summing RowSums over its valid tokens (only for kinds that need row-level
// quantities), then a token pass. Both kernels (CPU: one thread per row; CUDA: one block per row,
// cub block reductions in a fixed tree) call these functions, so they compute the same terms.

FASTRL_HOST_DEVICE_HOT bool needs_row_pass(const Params& p) {
  return p.kind == Kind::kGspo || p.kind == Kind::kGeoMean || p.level == RatioLevel::kSequence;
}

struct RowSums {
  double n, sx, sxm, sadv, slogw;
};
FASTRL_HOST_DEVICE_HOT RowSums row_sums_zero() { return RowSums{0.0, 0.0, 0.0, 0.0, 0.0}; }
FASTRL_HOST_DEVICE_HOT RowSums row_sums_add(const RowSums& a, const RowSums& b) {
  return RowSums{a.n + b.n, a.sx + b.sx, a.sxm + b.sxm, a.sadv + b.sadv, a.slogw + b.slogw};
}
// A valid token's contribution (is_w: its importance weight, or a negative value for none).
template <typename A>
FASTRL_HOST_DEVICE_HOT RowSums row_sums_token(const Params& p, A x, A adv, double is_w) {
  RowSums s{1.0, static_cast<double>(x), 0.0, 0.0, 0.0};
  if (p.kind == Kind::kGeoMean) {
    s.sxm = static_cast<double>(geo_clipped(x, adv, p.clip_low, p.clip_high));
    s.sadv = static_cast<double>(adv);
    s.slogw = is_w >= 0.0 ? ::log(is_w + 1e-10) : 0.0;
  }
  return s;
}

// Row-level quantities derived from the sums.
template <typename A>
struct RowCtx {
  double n;
  A ratio;            // gspo / sequence level: the row's ratio
  bool ratio_passes;  // its clamp passes the gradient
  double geo_ratio, geo_adv, geo_w;
};

template <typename A>
FASTRL_HOST_DEVICE_HOT RowCtx<A> row_ctx(const Params& p, const RowSums& s, bool has_is_w) {
  RowCtx<A> c{s.n, A(1), true, 1.0, 0.0, 1.0};
  if (p.kind == Kind::kGeoMean) {
    if (s.n > 0.0) {
      c.geo_ratio = ::exp(s.sxm / s.n);
      c.geo_adv = s.sadv / s.n;
      c.geo_w = has_is_w ? ::exp(s.slogw / s.n) : 1.0;
    }
  } else if (p.kind == Kind::kGspo) {  // verl: clamp(log s, max=10), stop-gradient form
    const A seq = static_cast<A>(s.sx / (s.n > 1.0 ? s.n : 1.0));
    c.ratio = exp_acc(seq > A(10) ? A(10) : seq);
    c.ratio_passes = seq <= A(10);
  } else if (p.level == RatioLevel::kSequence) {
    const A seq = static_cast<A>(s.sx / (s.n > 1.0 ? s.n : 1.0));
    c.ratio = exp_acc(clamp_log_ratio(seq, p.log_clamp));
    c.ratio_passes = log_ratio_passes(seq, p.log_clamp);
  }
  return c;
}

// Whether a token's ratio is its own exp (token level, geo_mean) rather than its row's (gspo,
// sequence level), and the argument of that exp.
FASTRL_HOST_DEVICE_HOT bool ratio_uses_exp(const Params& p) {
  return !(p.kind == Kind::kGspo || (p.level == RatioLevel::kSequence && p.kind != Kind::kGeoMean));
}
template <typename A>
FASTRL_HOST_DEVICE_HOT A ratio_exp_arg(const Params& p, A x) {
  return p.kind == Kind::kGeoMean ? x : clamp_log_ratio(x, p.log_clamp);
}

// A token's two exps: of ratio_exp_arg and of kl_exp_arg (0 where the kind / estimator takes none).
template <typename A>
struct TokenExps {
  A ratio, kl;
};
template <typename A>
FASTRL_HOST_DEVICE_HOT TokenExps<A> token_exps(const Params& p, A lp, A x, const A* ref) {
  return TokenExps<A>{ratio_uses_exp(p) ? exp_acc(ratio_exp_arg(p, x)) : A(0),
                      ref && kl_uses_exp(p.kl) ? exp_acc(kl_exp_arg(p.kl, lp, *ref)) : A(0)};
}

// The ratio a token's policy term sees (e_ratio = exp(ratio_exp_arg(p, x))), the log-ratio of its
// approx-KL metric (negated), and whether d ratio / d logp passes (token level).
template <typename A>
FASTRL_HOST_DEVICE_HOT A token_ratio(const Params& p, const RowCtx<A>& c, A x, A e_ratio, A* neg_log, bool* passes) {
  if (!ratio_uses_exp(p)) {
    *neg_log = -x;
    *passes = c.ratio_passes;
    return c.ratio;
  }
  if (p.kind == Kind::kGeoMean) {
    *neg_log = -x;
    *passes = true;
    return e_ratio;
  }
  *neg_log = -clamp_log_ratio(x, p.log_clamp);
  *passes = log_ratio_passes(x, p.log_clamp);
  return e_ratio;
}

// The statistics of a row (RowStat columns): sums, except kRatioMin / kRatioMax.
struct Stats {
  double v[kNumStats];
};
FASTRL_HOST_DEVICE_HOT Stats stats_zero() {
  Stats s;
  for (int k = 0; k < kNumStats; ++k) s.v[k] = 0.0;
  s.v[kRatioMin] = INFINITY;
  s.v[kRatioMax] = -INFINITY;
  return s;
}
FASTRL_HOST_DEVICE_HOT Stats stats_merge(const Stats& a, const Stats& b) {
  Stats s;
  for (int k = 0; k < kNumStats; ++k) s.v[k] = a.v[k] + b.v[k];
  s.v[kRatioMin] = nan_min(a.v[kRatioMin], b.v[kRatioMin]);
  s.v[kRatioMax] = nan_max(a.v[kRatioMax], b.v[kRatioMax]);
  return s;
}

// Accumulates one valid token into s (the kPolicy column of geo_mean is set per row by
// stats_finish; kRowAdd collects sum_t is_w d pg_t / d r for a TRL sequence-level row) and writes
// its derivatives: *dpol (of pg times is_w, without the row coefficients) and *daux (of aux).
// ref / entropy / is_w: pointers to the token's values, null when absent; e: token_exps(...).
template <typename A>
FASTRL_HOST_DEVICE_HOT void stats_token(const Params& p, const RowCtx<A>& c, A lp, A x, A adv, const A* ref,
                                    const A* entropy, const A* is_w, TokenExps<A> e, Stats* s, double* dpol,
                                    double* daux) {
  A neg_log;
  bool passes;
  const A r = token_ratio(p, c, x, e.ratio, &neg_log, &passes);
  if (p.kind == Kind::kGeoMean) {
    const bool clipped = x != credit::clamp_nan(x, A(-p.clip_low), A(p.clip_high));
    s->v[kClip] += static_cast<double>(clipped & (adv > A(0)));
    s->v[kClipLower] += static_cast<double>(clipped & (adv < A(0)));
    *dpol = static_cast<double>(geo_clipped_grad(x, adv, p.clip_low, p.clip_high));
  } else {
    const TokenTerms t = token_terms(p, adv, r, lp);
    const double w = is_w ? static_cast<double>(*is_w) : 1.0;
    s->v[kPolicy] += is_w ? t.pg * w : t.pg;
    s->v[kClip] += static_cast<double>(t.clip);
    s->v[kClipLower] += static_cast<double>(t.clip_lower);
    const bool seq = p.level == RatioLevel::kSequence && p.kind != Kind::kGspo;
    if (seq) s->v[kRowAdd] += t.d_r * w;
    *dpol = (t.d_lp + ((seq | !passes) ? 0.0 : t.d_r * static_cast<double>(r))) * w;
  }
  s->v[kCount] += 1.0;
  s->v[kLowRegion] += static_cast<double>((r < A(p.clip_lo)) & (adv < A(0)));
  s->v[kHighRegion] += static_cast<double>((r > A(p.clip_hi)) & (adv > A(0)));
  s->v[kNegLogRatio] += static_cast<double>(neg_log);
  const double rd = static_cast<double>(r);
  s->v[kRatioSum] += rd;
  s->v[kRatioMin] = nan_min(s->v[kRatioMin], rd);
  s->v[kRatioMax] = nan_max(s->v[kRatioMax], rd);
  *daux = 0.0;
  if (ref) {
    A grad;
    const double kl = static_cast<double>(kl_term(p.kl, lp, *ref, e.kl, &grad));
    s->v[kKlSum] += kl;
    s->v[kAux] += p.kl_coef * kl;
    *daux = p.kl_coef * static_cast<double>(grad);
  }
  if (entropy) {
    const double h = static_cast<double>(*entropy);
    s->v[kEntropySum] += h;
    s->v[kAux] -= p.entropy_coef * h;
  }
}

// The row's loss (geo_mean) and backward coefficients, from the context and the summed stats:
//   geo_mean  mul = -mean(A) exp(mean xm) w / n     (times dpol_t = d xm_t / d x_t)
//   TRL sequence level  add = (sum_t is_w d pg_t / d r) r / n   (d r / d logp_t = r / n)
template <typename A>
FASTRL_HOST_DEVICE_HOT void stats_finish(const Params& p, const RowCtx<A>& c, Stats* s) {
  const bool seq = p.level == RatioLevel::kSequence && p.kind != Kind::kGspo && p.kind != Kind::kGeoMean;
  double mul = 1.0, add = 0.0;
  if (p.kind == Kind::kGeoMean) {
    s->v[kPolicy] = -c.geo_adv * c.geo_ratio * c.geo_w;
    mul = c.n > 0.0 ? -c.geo_adv * c.geo_ratio * c.geo_w / c.n : 0.0;
  } else if (seq) {
    add = c.n > 0.0 && c.ratio_passes ? s->v[kRowAdd] * static_cast<double>(c.ratio) / c.n : 0.0;
  }
  s->v[kRowMul] = mul;
  s->v[kRowAdd] = add;
}

// ------------------------------------------------------------------------------------- finish
// The loss and the metrics from the rows' statistics: one pass over the rows for the counts (N
// valid tokens, S rows with a valid token: sums of integers, exact in any order), then one for the
// weighted sums. The CPU walks the rows in order, the CUDA kernel in one block (a fixed tree).

// The metrics vector (float32 [kNumMetrics]; fastrl.losses names the entries).
enum Metric : int {
  kMPolicyLoss = 0,  // scale * the aggregated policy term
  kMClipfrac = 1,    // token means of RowStat columns kClip .. kRatioSum (0 without valid token)
  kMClipfracLower = 2,
  kMClipLowFrac = 3,
  kMClipHighFrac = 4,
  kMApproxKl = 5,
  kMRatioMean = 6,
  kMRatioMin = 7,
  kMRatioMax = 8,
  kMNumTokens = 9,
  kMKlMean = 10,
  kMKlLoss = 11,      // scale * the aggregated KL (before kl_coef)
  kMEntropyMean = 12,
  kMEntropyLoss = 13,  // scale * the aggregated entropy (before entropy_coef)
  kNumMetrics = 14,
};

// The aggregation of one call. num_tokens / num_seqs: N, S given as numbers (NaN: not given).
struct FinishParams {
  Agg agg;
  bool geo_mean;
  double horizon, scale;
  double num_tokens, num_seqs;
};

FASTRL_HOST_DEVICE double inv_pos(double d) { return d > 0.0 ? 1.0 / d : 0.0; }

// w_b of a row of n valid tokens, with the operations of fastrl.reference.losses.agg_weights.
FASTRL_HOST_DEVICE double agg_weight(Agg agg, double n, double N, double S, double B, double horizon) {
  switch (agg) {
    case Agg::kTokenMean: return inv_pos(N);
    case Agg::kTokenSum: return 1.0;
    case Agg::kSeqMeanTokenSum: return inv_pos(S);
    case Agg::kSeqMeanTokenSumNorm: return inv_pos(S) / horizon;
    case Agg::kSeqMeanTokenMean: return inv_pos(n) * inv_pos(S);
    case Agg::kGrpo: return inv_pos(n > 1.0 ? n : 1.0) * inv_pos(B);
    case Agg::kDrGrpo: return inv_pos(B) / horizon;
    default: return inv_pos(B);  // kLuspo
  }
}

// First pass: valid tokens and non-empty rows.
struct Counts {
  double n, s;
};
FASTRL_HOST_DEVICE Counts counts_zero() { return Counts{0.0, 0.0}; }
FASTRL_HOST_DEVICE Counts counts_add(const Counts& a, const Counts& b) { return Counts{a.n + b.n, a.s + b.s}; }
FASTRL_HOST_DEVICE Counts counts_row(const double* row) {
  return Counts{row[kCount], row[kCount] > 0.0 ? 1.0 : 0.0};
}

// N, S, B of the weights: the numbers given, else counts[0..2] unless NaN (a device tensor, e.g. a
// process group's all-reduced counts; nullptr: none), else the counted ones (B: the rows).
struct AggCounts {
  double n_local, N, S, B;
};
FASTRL_HOST_DEVICE double count_or(const double* counts, int k, double local) {
  return counts && counts[k] == counts[k] ? counts[k] : local;
}
FASTRL_HOST_DEVICE AggCounts agg_counts(const FinishParams& f, const Counts& c, const double* counts,
                                        int64_t num_rows) {
  return AggCounts{c.n, f.num_tokens == f.num_tokens ? f.num_tokens : count_or(counts, 0, c.n),
                   f.num_seqs == f.num_seqs ? f.num_seqs : count_or(counts, 1, c.s),
                   count_or(counts, 2, static_cast<double>(num_rows))};
}

// Second pass: the weighted sums and the summed statistics (stats_merge: kRatioMin / kRatioMax
// are a min / max). policy: sum_b w_b P_b (geo_mean: sum_b P_b), loss: sum_b w_b (P_b + X_b)
// (geo_mean: sum_b w_b X_b), kl / entropy: sum_b w_b KL_b / H_b.
struct Totals {
  double policy, loss, kl, entropy;
  Stats cols;
};
FASTRL_HOST_DEVICE Totals totals_zero() { return Totals{0.0, 0.0, 0.0, 0.0, stats_zero()}; }
FASTRL_HOST_DEVICE Totals totals_add(const Totals& a, const Totals& b) {
  return Totals{a.policy + b.policy, a.loss + b.loss, a.kl + b.kl, a.entropy + b.entropy, stats_merge(a.cols, b.cols)};
}

// Row b's weight: written into its kWeight / kPolicyDiv columns for the backward; returns its
// contribution to the totals.
FASTRL_HOST_DEVICE Totals totals_row(const FinishParams& f, const AggCounts& c, double* row) {
  const double w = agg_weight(f.agg, row[kCount], c.N, c.S, c.B, f.horizon);
  row[kWeight] = w;
  row[kPolicyDiv] = f.geo_mean ? (c.B > 1.0 ? c.B : 1.0) : 0.0;
  Totals t;
  t.policy = f.geo_mean ? row[kPolicy] : w * row[kPolicy];
  t.loss = f.geo_mean ? w * row[kAux] : w * (row[kPolicy] + row[kAux]);
  t.kl = w * row[kKlSum];
  t.entropy = w * row[kEntropySum];
  for (int k = 0; k < kNumStats; ++k) t.cols.v[k] = row[k];
  return t;
}

// The loss (before its cast to the output dtype) and the metrics from the totals.
FASTRL_HOST_DEVICE double finish(const FinishParams& f, const AggCounts& c, const Totals& t, float* metrics) {
  const double div = c.B > 1.0 ? c.B : 1.0;
  const double pg = f.geo_mean ? t.policy / div : t.policy;
  const double loss = f.geo_mean ? pg + t.loss : t.loss;
  const double n = c.n_local;
  const bool has = n > 0.0;
  const double inv = has ? 1.0 / n : 0.0;
  const double* s = t.cols.v;
  metrics[kMPolicyLoss] = static_cast<float>(pg * f.scale);
  metrics[kMClipfrac] = static_cast<float>(s[kClip] * inv);
  metrics[kMClipfracLower] = static_cast<float>(s[kClipLower] * inv);
  metrics[kMClipLowFrac] = static_cast<float>(s[kLowRegion] * inv);
  metrics[kMClipHighFrac] = static_cast<float>(s[kHighRegion] * inv);
  metrics[kMApproxKl] = static_cast<float>(s[kNegLogRatio] * inv);
  metrics[kMRatioMean] = static_cast<float>(s[kRatioSum] * inv);
  metrics[kMRatioMin] = has ? static_cast<float>(s[kRatioMin]) : 0.0f;
  metrics[kMRatioMax] = has ? static_cast<float>(s[kRatioMax]) : 0.0f;
  metrics[kMNumTokens] = static_cast<float>(n);
  metrics[kMKlMean] = static_cast<float>(s[kKlSum] * inv);
  metrics[kMKlLoss] = static_cast<float>(t.kl * f.scale);
  metrics[kMEntropyMean] = static_cast<float>(s[kEntropySum] * inv);
  metrics[kMEntropyLoss] = static_cast<float>(t.entropy * f.scale);
  return loss * f.scale;
}

// ----------------------------------------------------------------------------------- backward
// What the backward needs of row b: the gradients of its kPolicy / kAux sums given g = the loss's
// incoming gradient times scale (the chain rule of finish: g w_b, or g / kPolicyDiv) and its
// coefficients (stats: [num_rows, kNumStats]).
struct RowGrad {
  double g_pol, g_aux, mul, add;
};
FASTRL_HOST_DEVICE_HOT RowGrad row_grad(double g, const double* stats, int64_t b) {
  const double* s = stats + b * kNumStats;
  const double g_aux = g * s[kWeight];
  return RowGrad{s[kPolicyDiv] > 0.0 ? g / s[kPolicyDiv] : g_aux, g_aux, s[kRowMul], s[kRowAdd]};
}

// d loss / d logp_t at a valid token of the row.
FASTRL_HOST_DEVICE_HOT double token_grad(const RowGrad& r, double dpol, double daux) {
  return r.g_pol * (dpol * r.mul + r.add) + r.g_aux * daux;
}

}  // namespace losses
}  // namespace fastrl
