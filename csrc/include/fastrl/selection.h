// Best-of-N selection math shared by the CPU and CUDA kernels: best_of_n's top-k keys and the
// atomic cascade that keeps them, and the exact expected best of k draws (best@k / worst@k),
// preference pairs and maj@k.
//
// The top-k order is total — a higher score first (lower with largest == false), equal scores by
// the lower sample index — so the selected set and its order do not depend on the order in which
// members are offered, nor on how partial lists are merged: the CPU kernel (sample chunks merged
// per group) and the CUDA kernel (atomic cascades) agree bitwise. NaN scores are never offered
// (the kernels skip them); +-inf are ordinary values.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastrl/common.h"

namespace fastrl {
namespace selection {

// ---------------------------------------------------------------------------------- packed keys
//
// best_of_n's list entries, on the CPU and on CUDA: one unsigned integer per member,
//   (order key of the score << index bits) | ~index,
// so "ranks before" (higher score, then lower index) is one unsigned compare and an empty slot is
// 0: every real member's key is > 0, because the order key of a non-NaN value never is (the
// smallest, that of -inf, is 0x007f'ffff for fp32; ~ of the largest, +inf, is as large).
// 64-bit keys for float/half/bf16 scores (compared as fp32) and indices < 2^32; 128-bit keys for
// fp64 scores or a larger batch (CPU only).

FASTRL_HOST_DEVICE uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}
FASTRL_HOST_DEVICE uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

// Order-preserving map of a non-NaN float to an unsigned integer of its width (-0 == +0); with
// largest == false the order is reversed.
template <typename Float>
FASTRL_HOST_DEVICE auto score_order(Float x, bool largest) -> decltype(bits_of(x)) {
  using Bits = decltype(bits_of(x));
  constexpr Bits sign = Bits{1} << (8 * sizeof(Bits) - 1);
  Bits b = x == Float{0} ? Bits{0} : bits_of(x);
  b = (b & sign) ? static_cast<Bits>(~b) : static_cast<Bits>(b | sign);
  return largest ? b : static_cast<Bits>(~b);
}

// Key (uint64_t or unsigned __int128) of sample i with score x (float, or double for 128 bits).
template <typename Key, typename Float>
FASTRL_HOST_DEVICE Key member_key(Float x, int64_t i, bool largest) {
  if constexpr (sizeof(Key) == 8) {
    const uint64_t order = score_order(static_cast<float>(x), largest);
    return (order << 32) | (~static_cast<uint64_t>(i) & 0xffffffffu);
  } else {
    const Key order = score_order(static_cast<double>(x), largest);
    return (order << 64) | ~static_cast<uint64_t>(i);
  }
}

// The sample index of a key, -1 for an empty slot.
template <typename Key>
FASTRL_HOST_DEVICE int64_t member_index(Key key) {
  if (key == 0) return -1;
  if constexpr (sizeof(Key) == 8) {
    return static_cast<int64_t>(~key & 0xffffffffu);
  } else {
    return static_cast<int64_t>(~static_cast<uint64_t>(key));
  }
}

// The lock-free top-k insert of the CUDA kernel: a group's k slots of 64-bit keys, best first,
// zeroed (empty) before the first offer. Every member offers its key down the slots with an atomic
// max, carrying on the smaller of the slot's old value and its own:
//   old = atomic_max(&slot[j], x);  x = min(old, x);  stop once x == 0 (it filled an empty slot)
// Correct under any interleaving of concurrent offers: one atomic max keeps the larger of {old, x}
// and passes the smaller on, so what leaves slot j is everything offered to it except what it
// holds, which is the largest of those; by induction, once every offer is done slot j holds the
// (j+1)-th largest key offered to the group. Keys are unique (the index bits), so the slots end as
// the group's sorted top k whatever the order of the atomics: deterministic, and bitwise the CPU
// lists. atomic_max(Slot*, uint64_t) returns the slot's old value.
template <typename Slot, typename AtomicMax>
FASTRL_HOST_DEVICE void cascade_offer(Slot* slots, int64_t k, uint64_t x, AtomicMax atomic_max) {
  for (int64_t j = 0; j < k && x != 0; ++j) {
    const uint64_t old = atomic_max(slots + j, x);
    x = old < x ? old : x;
  }
}

// The two-cascade top-k of the CUDA kernel for fp64 scores and batches past 2^32 samples, whose
// packed keys would not fit one 64-bit atomic. Both passes run cascade_offer, which is also right
// for repeated keys (one copy stays, the other passes on: slot j ends with the (j+1)-th largest of
// the multiset offered).
//   pass 1: every member offers score_key (score and order only) to its group's k "cut" slots,
//           which end as the group's k best score keys with repeats, best first;
//   pass 2: a member whose score key s ranks within the cut (tie_slots: the cut holds s in slots
//           [first, first + count)) offers index_key(i) to those slots of its group's list. The
//           members tied at s fill them, the lowest indices first, the others fall off the end.
// The lists end as the packed-key path's, bitwise: the sorted top k, ties by the lower index.
FASTRL_HOST_DEVICE uint64_t score_key(double x, bool largest) { return score_order(x, largest); }
FASTRL_HOST_DEVICE uint64_t index_key(int64_t i) { return ~static_cast<uint64_t>(i); }  // > 0
FASTRL_HOST_DEVICE int64_t index_of(uint64_t key) {
  return key == 0 ? -1 : static_cast<int64_t>(~key);
}

// Where score key s lands in a group's final cut[k]: false if below it (a full cut whose last key
// is greater), else the slots holding s (a group with fewer than k members has empty slots, 0,
// at the end, so every one of its members lands). count >= 1 when s was offered to the cut.
FASTRL_HOST_DEVICE bool tie_slots(const uint64_t* cut, int64_t k, uint64_t s, int64_t* first,
                                  int64_t* count) {
  if (cut[k - 1] > s) return false;
  int64_t above = 0, equal = 0;
  for (int64_t j = 0; j < k; ++j) {
    above += cut[j] > s;
    equal += cut[j] == s;
  }
  *first = above;
  *count = equal;
  return equal > 0;
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

// ---------------------------------------------------------------------------------------- pairs

// The preference pairs of one group, members[0..n) its sample indices in increasing order and
// x[i] sample i's score: every ordered (c, r) with x[c] - x[r] > margin in fp64 (margin >= 0, so
// never c == r; NaN never pairs), by c then r. Returns how many; with `chosen` non-null it also
// writes pair number q (0-based) at offset + q, for offset + q < max_pairs.
template <typename T>
FASTRL_HOST_DEVICE int64_t group_pairs(const int64_t* members, int64_t n, const T* x, double margin,
                                       int64_t offset, int64_t max_pairs, int64_t* chosen,
                                       int64_t* rejected) {
  int64_t count = 0;
  for (int64_t a = 0; a < n; ++a) {
    const double xc = static_cast<double>(x[members[a]]);
    for (int64_t b = 0; b < n; ++b) {
      if (!(xc - static_cast<double>(x[members[b]]) > margin)) continue;
      if (chosen != nullptr) {
        if (offset + count >= max_pairs) return count;  // the rest would not fit
        chosen[offset + count] = members[a];
        rejected[offset + count] = members[b];
      }
      ++count;
    }
  }
  return count;
}

// ---------------------------------------------------------------------------------------- maj@k
//
// Exact E[the majority vote of a uniform k-subset of a group is correct], for every k <= kmax at
// once (kmax <= the group's size n). The group's samples fall into A answer classes of sizes m_j,
// each correct or not; a subset drawing c_j of class j has weight prod_j C(m_j, c_j) among the
// C(n, k) subsets. For each vote count t of the winner (t = 1..kmax) a dynamic program adds the
// classes one by one over the states (s, w): s samples drawn so far, every c_j <= t, w classes at
// exactly t (the winners). D1[s][w] sums the weights of those draws, D2[s][w] the weights times
// the number of correct winners. A draw of s = k samples with w >= 1 winners has its majority at
// t votes, and a uniform tie-break is right with probability (correct winners) / w, so
//   num[k] += sum_{w >= 1} D2[k][w] / w,   den[k] += sum_{w >= 1} D1[k][w]
// and maj@k = num[k] / den[k] (den[k] is C(n, k), built from the same terms). The binomials are
// scaled by rho^c, rho the power of two nearest C(n, kmax)^(-1/kmax), so that no weight overflows
// for kmax <= kMaxMajK; rho^k is a common factor of num[k] and den[k] and a power of two scales
// every rounding exactly, so the result does not depend on rho, bitwise. All terms are positive
// and every product goes through mul_rn: the CPU (in place, one state after another) and the CUDA
// kernel (double-buffered, states in parallel) compute every state with the same operations in
// the same order, so they agree bitwise. Cost O(A kmax^3) per group; memory per group:
// A (kmax + 1) binomials, 2 (kmax + 1) (min(A, kmax) + 1) states (CUDA: twice that), 2 (kmax + 1)
// sums.
constexpr int64_t kMaxMajK = 1000;

// A class packed in one int64: its size times 2, plus 1 when its answer is correct.
FASTRL_HOST_DEVICE int64_t maj_class(int64_t size, bool ok) { return size * 2 + (ok ? 1 : 0); }
FASTRL_HOST_DEVICE int64_t maj_class_size(int64_t c) { return c >> 1; }
FASTRL_HOST_DEVICE bool maj_class_ok(int64_t c) { return (c & 1) != 0; }

FASTRL_HOST_DEVICE int64_t min3(int64_t a, int64_t b, int64_t c) {
  const int64_t m = a < b ? a : b;
  return m < c ? m : c;
}

// rho for a group of n samples and the largest k kmax (1 <= kmax <= n).
FASTRL_HOST_DEVICE double maj_scale(int64_t n, int64_t kmax) {
  double log_c = 0.0;  // log C(n, kmax)
  for (int64_t i = 0; i < kmax; ++i) {
    log_c += log(static_cast<double>(n - i) / static_cast<double>(kmax - i));
  }
  const double e = log_c / (static_cast<double>(kmax) * 0.69314718055994530942);  // log2(C) / kmax
  return ldexp(1.0, -static_cast<int>(floor(e + 0.5)));
}

// row[c] = C(m, c) rho^c for c = 0..kmax (0 past m).
FASTRL_HOST_DEVICE void maj_binomial_row(int64_t m, int64_t kmax, double rho, double* row) {
  row[0] = 1.0;
  for (int64_t c = 0; c < kmax; ++c) {
    row[c + 1] = c < m ? mul_rn(mul_rn(row[c], rho), static_cast<double>(m - c)) /
                             static_cast<double>(c + 1)
                       : 0.0;
  }
}

// The number of winner slots of the DP for vote count t: min(#classes of size >= t, kmax / t),
// plus one (w = 0).
FASTRL_HOST_DEVICE int64_t maj_width(const int64_t* cls, int64_t A, int64_t kmax, int64_t t) {
  int64_t can_win = 0;
  for (int64_t j = 0; j < A; ++j) can_win += maj_class_size(cls[j]) >= t;
  const int64_t most = kmax / t;
  return (can_win < most ? can_win : most) + 1;
}

// State (s, w) (row-major, W = width) after a class of `size` samples, correct or not, with
// binomial row `row` joins: from the states d1/d2 before it. Reads only (s, w) itself and states
// of smaller s, so an in-place update by decreasing s sees the same values as a double buffer.
FASTRL_HOST_DEVICE void maj_state(const double* d1, const double* d2, int64_t W, const double* row,
                                  int64_t size, bool ok, int64_t t, int64_t s, int64_t w,
                                  double* out1, double* out2) {
  double a1 = d1[s * W + w], a2 = d2[s * W + w];
  const int64_t cmax = min3(size, t, s);
  for (int64_t c = 1; c <= cmax; ++c) {
    if (c < t) {
      a1 += mul_rn(d1[(s - c) * W + w], row[c]);
      a2 += mul_rn(d2[(s - c) * W + w], row[c]);
    } else if (w > 0) {  // c == t: the class joins the winners
      const int64_t p = (s - t) * W + w - 1;
      a1 += mul_rn(d1[p], row[t]);
      a2 += mul_rn(ok ? d2[p] + d1[p] : d2[p], row[t]);
    }
  }
  *out1 = a1;
  *out2 = a2;
}

// Adds the draws of k samples whose winner has t votes to num[k], den[k].
FASTRL_HOST_DEVICE void maj_collect(const double* d1, const double* d2, int64_t W, int64_t k,
                                    double* num, double* den) {
  for (int64_t w = 1; w < W; ++w) {
    num[k] += d2[k * W + w] / static_cast<double>(w);
    den[k] += d1[k * W + w];
  }
}

// The whole DP of one group, sequential and in place (the CPU kernel): classes cls[A] (maj_class,
// in a fixed order), n samples, 1 <= kmax <= min(n, kMaxMajK). Scratch: chat[A (kmax + 1)],
// d1 and d2 [(kmax + 1) (min(A, kmax) + 1)] each. Writes num[0..kmax], den[0..kmax].
FASTRL_HOST_DEVICE void maj_vote_dp(const int64_t* cls, int64_t A, int64_t n, int64_t kmax,
                                    double* chat, double* d1, double* d2, double* num,
                                    double* den) {
  const int64_t K1 = kmax + 1;
  const double rho = maj_scale(n, kmax);
  for (int64_t j = 0; j < A; ++j) {
    maj_binomial_row(maj_class_size(cls[j]), kmax, rho, chat + j * K1);
  }
  for (int64_t k = 0; k < K1; ++k) num[k] = den[k] = 0.0;
  for (int64_t t = 1; t <= kmax; ++t) {
    const int64_t W = maj_width(cls, A, kmax, t);
    for (int64_t p = 0; p < K1 * W; ++p) d1[p] = d2[p] = 0.0;
    d1[0] = 1.0;
    for (int64_t j = 0; j < A; ++j) {
      const int64_t size = maj_class_size(cls[j]);
      const bool ok = maj_class_ok(cls[j]);
      for (int64_t s = kmax; s >= 1; --s) {
        for (int64_t w = 0; w < W; ++w) {
          maj_state(d1, d2, W, chat + j * K1, size, ok, t, s, w, d1 + s * W + w, d2 + s * W + w);
        }
      }
    }
    for (int64_t k = t; k <= kmax; ++k) maj_collect(d1, d2, W, k, num, den);
  }
}

}  // namespace selection
}  // namespace fastrl
