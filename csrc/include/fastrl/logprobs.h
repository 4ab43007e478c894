// Log-prob gathering math shared by the CPU and CUDA kernels: the online softmax state of a row.
//
// For scaled logits z_j = x_j * (1 / T) of a row, a state summarizes any subset of the row as
//   m = max z_j,   s = sum exp(z_j - m),   t = sum exp(z_j - m) * (z_j - m)        (fp32)
// from which   lse = m + log(s),   entropy H = -sum p log p = log(s) - t / s.
// Two states merge exactly (up to rounding) by rescaling to the larger max, so a row can be
// split into pieces (lanes, blocks, threads) and the pieces merged in a fixed order: the result
// depends only on that order, never on the number of threads or on the other rows.
//
// Special values: an empty state is (m = -inf, s = 0, t = 0). -inf logits have probability 0
// (they add nothing, and their entropy term 0 * log 0 is 0). A NaN or +inf logit makes s (and so
// lse, log-prob and entropy) NaN; a row of only -inf logits has lse = -inf and NaN log-probs.
#pragma once

#include "fastrl/common.h"

namespace fastrl {
namespace logprobs {

struct SoftmaxState {
  float m;  // running max of z (-inf when empty)
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * (z - m)
};

FASTRL_HOST_DEVICE SoftmaxState state_empty() {
  SoftmaxState st;
  st.m = -INFINITY;
  st.s = 0.0f;
  st.t = 0.0f;
  return st;
}

// exp(z - m) * (z - m) with the convention 0 * (-inf) = 0 for a probability-0 term: the difference
// is clamped to -FLT_MAX (written as a select, so a NaN difference stays NaN).
FASTRL_HOST_DEVICE float clamp_diff(float d) { return d < -3.402823466e38f ? -3.402823466e38f : d; }

// A state rescaled from max `m` to the larger max `m_new` (m_new >= m, both may be -inf).
FASTRL_HOST_DEVICE SoftmaxState rescale(const SoftmaxState& a, float m_new, float scale) {
  SoftmaxState r;
  r.m = m_new;
  r.s = a.s * scale;
  const float dm = a.m == m_new ? 0.0f : clamp_diff(a.m - m_new);  // -inf - -inf: no shift, not NaN
  r.t = scale * (a.t + dm * a.s);
  return r;
}

// The state of the union of two disjoint pieces. Not commutative in rounding: callers merge in a
// fixed order. Uses expf, so the last bits of the two devices' merges may differ.
FASTRL_HOST_DEVICE SoftmaxState merge(const SoftmaxState& a, const SoftmaxState& b) {
  const float m = b.m > a.m ? b.m : a.m;
  if (m == -INFINITY) {  // both have probability 0: nothing to rescale, but a NaN (s = NaN) must survive
    SoftmaxState r = a;
    r.s = a.s + b.s;
    r.t = a.t + b.t;
    return r;
  }
  const float sa = a.m == m ? 1.0f : expf(a.m - m);
  const float sb = b.m == m ? 1.0f : expf(b.m - m);
  const SoftmaxState ra = rescale(a, m, sa);
  const SoftmaxState rb = rescale(b, m, sb);
  SoftmaxState r;
  r.m = m;
  r.s = ra.s + rb.s;
  r.t = ra.t + rb.t;
  return r;
}

FASTRL_HOST_DEVICE float state_lse(const SoftmaxState& st) { return st.m + logf(st.s); }

FASTRL_HOST_DEVICE float state_entropy(const SoftmaxState& st) { return logf(st.s) - st.t / st.s; }

// d/dz_j of  sum_k g_lp[k] * log p(y_k) + g_ent * H + g_lse * lse  at one element, with z_j the
// scaled logit, lse and H of the row, g_lp the sum of g_lp[k] over the row's (non-ignored) labels
// and label_weight the sum of g_lp[k] over the labels y_k == j (0 if j is no label). The caller
// multiplies by 1/T to get d/dx_j:
//   d log p(y)/dz_j = [j == y] - p_j,   dH/dz_j = -p_j (log p_j + H),   d lse/dz_j = p_j.
FASTRL_HOST_DEVICE float grad_z_labels(float z, float p, float lse, float entropy, float g_lp,
                                       float g_ent, float g_lse, float label_weight) {
  const float log_p = clamp_diff(z - lse);
  const float coef = g_lp - g_lse + g_ent * (log_p + entropy);
  const float p_coef = p == 0.0f ? 0.0f : p * coef;  // a probability-0 term has no gradient
  return label_weight - p_coef;
}

// The same for one label y per row: is_label = (j == y) (false for an ignored label, whose g_lp is
// then 0 too).
FASTRL_HOST_DEVICE float grad_z(float z, float p, float lse, float entropy, float g_lp,
                                float g_ent, float g_lse, bool is_label) {
  return grad_z_labels(z, p, lse, entropy, g_lp, g_ent, g_lse, is_label ? g_lp : 0.0f);
}

}  // namespace logprobs
}  // namespace fastrl
