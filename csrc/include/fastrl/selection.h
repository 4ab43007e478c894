// Best-of-N selection math shared by the CPU and CUDA kernels: a bounded top-k insert and the
// exact expected best of k draws (best@k / worst@k).
//
// The top-k order is total — a higher score first (lower with largest == false), equal scores by
// the lower sample index — so the selected set and its order do not depend on the order in which
// members are offered, nor on how partial lists are merged: the CPU kernel (sample chunks merged
// per group) and the CUDA kernel (sorted segments) agree bitwise. NaN scores are never offered
// (the kernels skip them); +-inf are ordinary values.
#pragma once

#include <cstdint>

#include "fastrl/common.h"

namespace fastrl {
namespace selection {

// A group's top-k list: k slots of (key, sample index), best first. key = x for the largest
// scores, -x for the smallest, so "better" is always "greater key, then lower index". Empty slots
// hold the sentinel (-inf, kNoSample), which every real member outranks (a real -inf key has a
// lower index), so the insert needs no fill count.
constexpr int64_t kNoSample = INT64_MAX;

FASTRL_HOST_DEVICE double topk_key(double x, bool largest) { return largest ? x : -x; }

FASTRL_HOST_DEVICE bool ranks_before(double a, int64_t ia, double b, int64_t ib) {
  return (a > b) | ((a == b) & (ia < ib));
}

FASTRL_HOST_DEVICE void topk_clear(double* key, int64_t* idx, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    key[j] = -INFINITY;
    idx[j] = kNoSample;
  }
}

// Offers sample i with key `x` (not NaN): one comparison rejects a member that ranks below the
// list (the common case once a group's list is full), else an insertion shift. O(k) worst case.
// (Measured on random order, k = 1..16: faster than a select-only, branch-free update, which
// stores to the list for every member.)
FASTRL_HOST_DEVICE void topk_offer(double* key, int64_t* idx, int64_t k, double x, int64_t i) {
  if (!ranks_before(x, i, key[k - 1], idx[k - 1])) return;
  int64_t pos = k - 1;
  while (pos > 0 && ranks_before(x, i, key[pos - 1], idx[pos - 1])) {
    key[pos] = key[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  key[pos] = x;
  idx[pos] = i;
}

// The sample indices of a list, -1 for empty slots (a group with fewer than k non-NaN members).
FASTRL_HOST_DEVICE void topk_write(const int64_t* idx, int64_t k, int64_t* out) {
  for (int64_t j = 0; j < k; ++j) out[j] = idx[j] == kNoSample ? -1 : idx[j];
}

// Expected best of k draws from a group of n values given best first — rank r (1-based) at
// v[(r-1) * step], so a group sorted in either direction is read in place (step = -1 from its last
// element); the best is the largest for best@k, the smallest for worst@k — summed in rank order
// in fp64:
//   without replacement: sum_r C(n-r, k-1) / C(n, k) v_r     (mean over all k-subsets; k <= n)
//   with replacement:    sum_r (((n-r+1)/n)^k - ((n-r)/n)^k) v_r
// The first weights come from w_1 = k/n, w_{r+1} = w_r (n-r-k+1) / (n-r): every factor lies in
// [0, 1], so no binomial is ever formed (no overflow, no cancellation). NaN where undefined (n = 0,
// or k > n without replacement). A zero weight never multiplies a value (0 * inf would be NaN).
// Without replacement the CPU and CUDA kernels agree bitwise (mul_rn, no libm call); with
// replacement they may differ in the last bits (the device pow is not correctly rounded).
FASTRL_HOST_DEVICE double expected_best(const double* v, int64_t step, int64_t n, int64_t k,
                                        bool replacement) {
  if (n == 0 || (!replacement && k > n)) return NAN;
  const double dn = static_cast<double>(n), dk = static_cast<double>(k);
  double sum = 0.0;
  if (replacement) {
    for (int64_t r = 1; r <= n; ++r) {
      const double w = pow((dn - r + 1) / dn, dk) - pow((dn - r) / dn, dk);
      if (w > 0.0) sum += mul_rn(w, v[(r - 1) * step]);
    }
    return sum;
  }
  double w = dk / dn;
  for (int64_t r = 1; r <= n - k + 1; ++r) {
    sum += mul_rn(w, v[(r - 1) * step]);
    w = w * static_cast<double>(n - r - k + 1) / static_cast<double>(n - r);
  }
  return sum;
}

}  // namespace selection
}  // namespace fastrl
