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

struct Moments {
  double count;
  double mean;
  double m2;
};

FASTRL_HOST_DEVICE Moments moments_empty() { return Moments{0.0, 0.0, 0.0}; }

FASTRL_HOST_DEVICE Moments moments_merge(const Moments& a, const Moments& b) {
  if (b.count == 0.0) return a;
  if (a.count == 0.0) return b;
  const double n = a.count + b.count;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + fastrl::mul_rn(delta, b.count / n),
                 a.m2 + b.m2 + fastrl::mul_rn(fastrl::mul_rn(delta, delta), a.count * b.count / n)};
}

// verl's masked_mean: sum / (count + 1e-8), i.e. 0 for an empty mask (the 1e-8 is below fp32's
// resolution for any count >= 1, so the plain count is used).
FASTRL_HOST_DEVICE double masked_mean(const Moments& m) { return m.count > 0.0 ? m.mean : 0.0; }

// verl's masked_var: biased m2 / count (0 for an empty mask); unbiased m2 / (count - 1), only
// defined for count >= 2 (the caller raises otherwise, as verl does).
FASTRL_HOST_DEVICE double masked_var(const Moments& m, bool unbiased) {
  if (unbiased) return m.m2 / (m.count - 1.0);
  return m.count > 0.0 ? m.m2 / m.count : 0.0;
}

}  // namespace credit
}  // namespace fastrl
