// Token-level credit-assignment math shared by the CPU and CUDA kernels.
//
// Every recurrence of the family runs backwards over a row (t = T-1 .. 0) and is an affine map of
// a carried scalar:  carry_t = d_t + c_t * carry_{t+1}  (carry after the row's end = 0).
// A position that must be skipped (a masked token the recurrence passes through) is the identity
// element (c, d) = (1, 0). Affine maps compose associatively, so the CPU walks each row once in
// order while the CUDA kernel runs a block-wide scan over (c, d) pairs; both build the pairs with
// the functions below.
//
// Rounding. The CPU applies the maps one after the other exactly as verl's Python loops do (same
// operations, same order, accumulation in the inputs' float type, no FMA): on fp32 inputs its GAE
// and REINFORCE++ returns are bitwise verl's. A parallel scan re-associates the products, so the
// CUDA results differ from the CPU's by rounding (a few ulps of the largest |carry| on the row);
// each is deterministic on its own.
#pragma once

#include <type_traits>

#include "fastrl/common.h"

namespace fastrl {
namespace credit {

// a * b never contracted into an FMA with a neighbouring add (see fastrl::mul_rn in common.h).
FASTRL_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTRL_HOST_DEVICE double mul_rn(double a, double b) { return fastrl::mul_rn(a, b); }

// x -> d + c * x
template <typename A>
struct Affine {
  A c;
  A d;
};

template <typename A>
FASTRL_HOST_DEVICE Affine<A> identity() {
  return Affine<A>{A(1), A(0)};
}

template <typename A>
FASTRL_HOST_DEVICE A apply(const Affine<A>& f, A x) {
  return f.d + mul_rn(f.c, x);
}

// `first` then `second`: x -> second(first(x)). In a backward scan `first` is the later positions.
template <typename A>
FASTRL_HOST_DEVICE Affine<A> then(const Affine<A>& first, const Affine<A>& second) {
  return Affine<A>{mul_rn(second.c, first.c), second.d + mul_rn(second.c, first.d)};
}

// ------------------------------------------------------------------------------------------ GAE
// verl 0.9.1 compute_gae_advantage_return, per row, t descending:
//   delta_t = r_t + gamma * nv_t - v_t        nv_t = value of the next valid position after t (0 if none)
//   A_t     = valid_t ? delta_t + gamma*lam * A_{t+1} : A_{t+1}      (masked tokens are transparent)
//   returns_t = A_t + v_t                                              (at every position)
// gamma_lam is gamma * lam rounded once to A (verl multiplies the two Python floats first).

template <typename A>
FASTRL_HOST_DEVICE Affine<A> gae_step(A r, A v, A next_value, bool valid, A gamma, A gamma_lam) {
  return valid ? Affine<A>{gamma_lam, (r + mul_rn(gamma, next_value)) - v} : identity<A>();
}

// The next value seen by the position before t.
template <typename A>
FASTRL_HOST_DEVICE A next_value(bool valid, A v, A next_value_after) {
  return valid ? v : next_value_after;
}

// GAE modes: what a masked position (mask_t == 0) does.
enum class GaeMode : int32_t {
  // verl: masked tokens are transparent (value and lambda-carry skip them).
  kSkip = 0,
  // A masked token ends the episode: the carry and the next value restart from 0 below it; masked
  // positions output A = 0 (R = v).
  kReset = 1,
  // OpenRLHF get_advantages_and_returns: every position is a step, with r and v zeroed where the
  // mask is 0 and the next value taken from the next position (masked or not); R = A + mask * v.
  kDense = 2,
};

// Turn boundaries (the `dones` input). The step positions of a row are its valid tokens (kSkip,
// kReset) or all of its positions (kDense). A done flag on a step position t ends a turn at t; a
// done flag on a non-step position ends the turn at the nearest step position before it (a flag
// anywhere in an observation span ends the turn of the response before it). At a turn end the step
// uses (turn_gamma, turn_gamma * turn_lam) in place of (gamma, gamma * lam):
//   delta_t = r_t + turn_gamma * nv_t - v_t,   A_t = delta_t + turn_gamma * turn_lam * A_{t+1}
// so turn_gamma = 0 cuts the recurrence (no bootstrap and no advantage carried across turns) and
// gamma = lam = 1 with turn_gamma, turn_lam < 1 discounts per turn instead of per token.
template <typename A>
struct GaeCoefs {
  A gamma, gamma_lam;            // inside a turn
  A turn_gamma, turn_gamma_lam;  // at a turn end
};

// The step of step position t; `turn_end` = done_t or a done flag pending from the non-step
// positions right after t.
template <typename A>
FASTRL_HOST_DEVICE Affine<A> gae_turn_step(A r, A v, A next_value, bool turn_end,
                                           const GaeCoefs<A>& k) {
  return turn_end ? gae_step(r, v, next_value, true, k.turn_gamma, k.turn_gamma_lam)
                  : gae_step(r, v, next_value, true, k.gamma, k.gamma_lam);
}

// The step of a non-step position (kSkip: identity, kReset: restart from 0).
template <typename A>
FASTRL_HOST_DEVICE Affine<A> gae_gap_step(GaeMode mode) {
  return mode == GaeMode::kReset ? Affine<A>{A(0), A(0)} : identity<A>();
}

// ----------------------------------------------------------------------------- discounted returns

enum class ReturnsMode : int32_t {
  // verl 0.9.1 REINFORCE++: G_t = r_t + gamma * G_{t+1} on valid tokens; masked tokens output 0
  // and pass the running return through unchanged (multi-turn observation spans).
  kSkip = 0,
  // The running return resets to 0 at masked tokens (a masked span ends the episode); outputs as
  // kSkip (0 at masked tokens).
  kReset = 1,
  // Reverse cumulative sum of the masked rewards, G_t = m_t r_t + gamma * G_{t+1} at every position
  // (ReMax's returns with gamma = 1).
  kCumsum = 2,
};

template <typename A>
FASTRL_HOST_DEVICE Affine<A> returns_step(A r, bool valid, A gamma, ReturnsMode mode) {
  switch (mode) {
    case ReturnsMode::kSkip:
      return valid ? Affine<A>{gamma, r} : identity<A>();
    case ReturnsMode::kReset:
      return valid ? Affine<A>{gamma, r} : Affine<A>{A(0), A(0)};
    default:
      return Affine<A>{gamma, valid ? r : A(0)};
  }
}

// Turn ends (the `dones` input), as for GAE: the step positions are the valid tokens (kSkip,
// kReset) or every position (kCumsum); a done flag on a step position t ends a turn at t, a flag on
// a non-step position ends the turn at the nearest step position before it. At a turn end the
// discount is turn_gamma:  G_t = r_t + turn_gamma * G_{t+1}  (turn_gamma = 0: each turn its own
// episode; gamma = 1, turn_gamma < 1: discounting per turn instead of per token).
FASTRL_HOST_DEVICE bool returns_is_step(bool valid, ReturnsMode mode) {
  return valid || mode == ReturnsMode::kCumsum;
}

// The step of position t; `turn_end` = done_t or a done flag pending from the non-step positions
// right after t (ignored at non-step positions).
template <typename A>
FASTRL_HOST_DEVICE Affine<A> returns_turn_step(A r, bool valid, bool turn_end, A gamma,
                                               A turn_gamma, ReturnsMode mode) {
  return returns_step(r, valid, turn_end ? turn_gamma : gamma, mode);
}

// The returns output at a position whose carry (after applying its step) is `carry`.
template <typename A>
FASTRL_HOST_DEVICE A returns_output(A carry, bool valid, ReturnsMode mode) {
  return (valid || mode == ReturnsMode::kCumsum) ? carry : A(0);
}

// --------------------------------------------------------------------------------- masked moments
// (count, mean, m2 = sum of squared deviations) of the valid elements, fp64. Each fixed-size chunk
// is summarized with two passes over it (sum, then squared deviations from the chunk mean), and
// the chunk summaries are merged in chunk order with Chan's formula: stable, and the result does
// not depend on the thread count.

using fastrl::Moments;  // common.h: (count, mean, M2) and Chan's merge
using fastrl::moments_empty;
using fastrl::moments_merge;

// verl's masked_mean: sum / (count + 1e-8), i.e. 0 for an empty mask (the 1e-8 is below fp32's
// resolution for any count >= 1, so the plain count is used).
FASTRL_HOST_DEVICE double masked_mean(const Moments& m) { return m.count > 0.0 ? m.mean : 0.0; }

// verl's masked_var: biased m2 / count (0 for an empty mask); unbiased m2 / (count - 1), only
// defined for count >= 2 (the caller raises otherwise, as verl does).
FASTRL_HOST_DEVICE double masked_var(const Moments& m, bool unbiased) {
  if (unbiased) return m.m2 / (m.count - 1.0);
  return m.count > 0.0 ? m.m2 / m.count : 0.0;
}

// verl's masked_whiten as an affine map, out = (x - shift) * scale + add: shift = mean,
// scale = 1 / sqrt(var + eps), add = 0 (shift_mean) or mean. The CPU and CUDA kernels both compute
// the coefficients and the value in fp64 with these functions (no FMA), so the same moments and
// input give the same bits on both; the caller rounds the value once to its output type.
struct WhitenCoefs {
  double shift;
  double scale;
  double add;
};

FASTRL_HOST_DEVICE WhitenCoefs whiten_coefs(const Moments& m, bool shift_mean, bool unbiased,
                                            double eps) {
  const double mean = masked_mean(m);
  return WhitenCoefs{mean, 1.0 / ::sqrt(masked_var(m, unbiased) + eps), shift_mean ? 0.0 : mean};
}

FASTRL_HOST_DEVICE double whiten_value(double x, const WhitenCoefs& k) {
  return fastrl::mul_rn(x - k.shift, k.scale) + k.add;
}


// ------------------------------------------------------------------------------------- KL penalty
// Per-token KL estimators of log p (logp) against a reference (ref), http://joschu.net/blog/kl-approx.html.
// d = logp - ref, computed in A (fp32, fp64 for fp64 inputs) exactly as the trainers write it:
//
//   kind   verl 0.9.1 kl_penalty_forward                         OpenRLHF compute_approx_kl (fp32)
//   k1     d                                                     clamp(d, -10, 10)
//   abs    |d|                                                   (not an OpenRLHF estimator)
//   k2     0.5 * (d * d)                                         clamp((d * d) / 2, -10, 10)
//   k3     kl = clamp(ref - logp, -20, 20);                       x = -d;
//          clamp((exp(kl) - kl) - 1, -10, 10)                    clamp((exp(x) - 1) - x, -10, 10)
//
// kOpenRLHFUnclamped is OpenRLHF's compute_approx_kl before its final clamp was added (the same
// fp32 formulas, no clamp: k3 = (exp(x) - 1) - x grows without bound, +inf for x > ~88.7).
//
// clamp propagates NaN (as torch.clamp). kl_grad is d value / d logp with torch.clamp's gradient
// rule (gradient passes where lo <= input <= hi, 0 outside); d value / d ref is its negative, as
// every estimator is a function of d alone.

enum class KlKind : int32_t { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };
enum class KlConvention : int32_t { kVerl = 0, kOpenRLHF = 1, kOpenRLHFUnclamped = 2 };

template <typename A>
FASTRL_HOST_DEVICE A clamp_nan(A x, A lo, A hi) {
  return x < lo ? lo : (x > hi ? hi : x);  // a NaN compares false both times: kept
}
template <typename A>
FASTRL_HOST_DEVICE bool in_range(A x, A lo, A hi) {
  return (x >= lo) & (x <= hi);  // not &&: a select for the compiler, not a data-dependent branch
}
FASTRL_HOST_DEVICE float exp_acc(float x) { return ::expf(x); }
FASTRL_HOST_DEVICE double exp_acc(double x) { return ::exp(x); }
FASTRL_HOST_DEVICE float abs_acc(float x) { return ::fabsf(x); }
FASTRL_HOST_DEVICE double abs_acc(double x) { return ::fabs(x); }

// k3 with its exp given, e = exp_acc(k3_exp_arg<C>(logp, ref)): kl_value / kl_grad below, and the
// policy-loss kernel, whose CPU path takes a block's exps on SIMD lanes first.
template <KlConvention C, typename A>
FASTRL_HOST_DEVICE A k3_exp_arg(A logp, A ref) {
  return C == KlConvention::kVerl ? clamp_nan(ref - logp, A(-20), A(20)) : -(logp - ref);
}
template <KlConvention C, typename A>
FASTRL_HOST_DEVICE A k3_value_e(A logp, A ref, A e) {
  const A x = k3_exp_arg<C>(logp, ref);
  if constexpr (C == KlConvention::kVerl) return clamp_nan((e - x) - A(1), A(-10), A(10));
  const A y = (e - A(1)) - x;
  return C == KlConvention::kOpenRLHFUnclamped ? y : clamp_nan(y, A(-10), A(10));
}
template <KlConvention C, typename A>
FASTRL_HOST_DEVICE A k3_grad_e(A logp, A ref, A e) {
  if constexpr (C == KlConvention::kVerl) {
    const A raw = ref - logp;
    const A v = (e - clamp_nan(raw, A(-20), A(20))) - A(1);
    return (in_range(raw, A(-20), A(20)) & in_range(v, A(-10), A(10))) ? A(1) - e : A(0);
  } else if constexpr (C == KlConvention::kOpenRLHFUnclamped) {
    return A(1) - e;
  } else {
    return in_range((e - A(1)) - k3_exp_arg<C>(logp, ref), A(-10), A(10)) ? A(1) - e : A(0);
  }
}

template <KlKind K, KlConvention C, typename A>
FASTRL_HOST_DEVICE A kl_value(A logp, A ref) {
  const A d = logp - ref;
  if constexpr (C == KlConvention::kVerl) {
    if constexpr (K == KlKind::kK1) {
      return d;
    } else if constexpr (K == KlKind::kAbs) {
      return abs_acc(d);
    } else if constexpr (K == KlKind::kK2) {
      return mul_rn(A(0.5), mul_rn(d, d));
    } else {
      return k3_value_e<C>(logp, ref, exp_acc(k3_exp_arg<C>(logp, ref)));
    }
  } else {
    if constexpr (K == KlKind::kK3) {  // (kAbs is rejected by the callers)
      return k3_value_e<C>(logp, ref, exp_acc(k3_exp_arg<C>(logp, ref)));
    }
    const A y = K == KlKind::kK1 ? d : mul_rn(d, d) / A(2);
    return C == KlConvention::kOpenRLHFUnclamped ? y : clamp_nan(y, A(-10), A(10));
  }
}

// d kl_value<K, C> / d logp.
template <KlKind K, KlConvention C, typename A>
FASTRL_HOST_DEVICE A kl_grad(A logp, A ref) {
  const A d = logp - ref;
  if constexpr (C == KlConvention::kVerl) {
    if constexpr (K == KlKind::kK1) {
      return A(1);
    } else if constexpr (K == KlKind::kAbs) {
      return d > A(0) ? A(1) : (d < A(0) ? A(-1) : mul_rn(d, A(0)));  // sign, NaN kept
    } else if constexpr (K == KlKind::kK2) {
      return d;
    } else {
      return k3_grad_e<C>(logp, ref, exp_acc(k3_exp_arg<C>(logp, ref)));
    }
  } else if constexpr (K == KlKind::kK3) {
    return k3_grad_e<C>(logp, ref, exp_acc(k3_exp_arg<C>(logp, ref)));
  } else if constexpr (C == KlConvention::kOpenRLHFUnclamped) {
    return K == KlKind::kK1 ? A(1) : d;
  } else {
    if constexpr (K == KlKind::kK1) {
      return in_range(d, A(-10), A(10)) ? A(1) : A(0);
    } else {
      return in_range(mul_rn(d, d) / A(2), A(-10), A(10)) ? d : A(0);
    }
  }
}

// Calls f(std::integral_constant<KlKind, K>{}, std::integral_constant<KlConvention, C>{}) for the
// runtime (kind, convention): the element loops are then compiled per estimator, branch-free.
template <typename F>
inline void dispatch_kl(KlKind kind, KlConvention conv, F&& f) {
  using V = std::integral_constant<KlConvention, KlConvention::kVerl>;
  using O = std::integral_constant<KlConvention, KlConvention::kOpenRLHF>;
  using U = std::integral_constant<KlConvention, KlConvention::kOpenRLHFUnclamped>;
  using K1 = std::integral_constant<KlKind, KlKind::kK1>;
  using K2 = std::integral_constant<KlKind, KlKind::kK2>;
  using K3 = std::integral_constant<KlKind, KlKind::kK3>;
  if (conv == KlConvention::kVerl) {
    switch (kind) {
      case KlKind::kK1: f(K1{}, V{}); break;
      case KlKind::kAbs: f(std::integral_constant<KlKind, KlKind::kAbs>{}, V{}); break;
      case KlKind::kK2: f(K2{}, V{}); break;
      default: f(K3{}, V{}); break;
    }
  } else if (conv == KlConvention::kOpenRLHF) {
    switch (kind) {
      case KlKind::kK1: f(K1{}, O{}); break;
      case KlKind::kK2: f(K2{}, O{}); break;
      default: f(K3{}, O{}); break;
    }
  } else {
    switch (kind) {
      case KlKind::kK1: f(K1{}, U{}); break;
      case KlKind::kK2: f(K2{}, U{}); break;
      default: f(K3{}, U{}); break;
    }
  }
}

// ---------------------------------------------------------------------------------- token rewards
// OpenRLHF compute_reward / TRL PPO: at a valid token t of a row,
//   r_t = (t is the row's last valid token ? score : 0) - kl_coef * kl_t
// and 0 at masked tokens. `score` is already clipped; kl_t is 0 when no KL is given.
template <typename A>
FASTRL_HOST_DEVICE A token_reward(bool valid, bool last, A score, A kl_coef, A kl) {
  const A penalty = mul_rn(kl_coef, kl);
  return valid ? (last ? score - penalty : A(0) - penalty) : A(0);  // 0 - p: +0 when p = 0
}


// ------------------------------------------------------------------------------ implicit rewards
// PRIME's implicit process reward of token t: beta * (logp_t - ref_t), d computed in A first.
template <typename A>
FASTRL_HOST_DEVICE A implicit_reward(A logp, A ref, A beta) {
  return mul_rn(beta, logp - ref);
}

// ------------------------------------------------------------------------------ segment reductions
// Token -> sequence reductions over the valid tokens of a row, fp64 accumulation in token order:
//   sum      S = sum_t x_t
//   mean     S / n                  (n = number of valid tokens; 0 for n = 0)
//   geomean  exp(S / n)             (x is a log-ratio: GSPO's sequence ratio; 1 = exp(0) for n = 0)
//   last     x at the last valid token (0 for n = 0)
// and d out / d x_t at a valid token t (0 at masked tokens):
//   sum 1;  mean 1 / n;  geomean exp(S / n) / n;  last [t is the last valid token].

enum class SegmentReduce : int32_t { kSum = 0, kMean = 1, kGeomean = 2, kLast = 3 };

FASTRL_HOST_DEVICE double segment_value(SegmentReduce op, double sum, double count, double last) {
  switch (op) {
    case SegmentReduce::kSum: return sum;
    case SegmentReduce::kMean: return count > 0.0 ? sum / count : 0.0;
    case SegmentReduce::kGeomean: return count > 0.0 ? ::exp(sum / count) : 1.0;
    default: return count > 0.0 ? last : 0.0;
  }
}

// The gradient factor of every valid token but the last (`is_last` false) or of the last one.
FASTRL_HOST_DEVICE double segment_grad(SegmentReduce op, double sum, double count, bool is_last) {
  switch (op) {
    case SegmentReduce::kSum: return 1.0;
    case SegmentReduce::kMean: return 1.0 / count;
    case SegmentReduce::kGeomean: return ::exp(sum / count) / count;
    default: return is_last ? 1.0 : 0.0;
  }
}

}  // namespace credit
}  // namespace fastrl
