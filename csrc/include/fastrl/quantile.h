// Math of the exact masked quantile (fastrl.sampling.quantile_mask), shared by the CPU op and the
// CUDA kernels: torch.quantile's rank arithmetic and the order-preserving integer keys of the
// radix select.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastrl/common.h"

namespace fastrl {
namespace quantile {

// The type an input type's values are compared and interpolated in (torch.quantile's dtype for
// it): double for double, float for float and the half types (exact conversions).
template <typename T>
using value_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

// Above this many values torch.quantile refuses; we compute the rank in fp64 there.
constexpr int64_t kMaxTorchQuantileSize = int64_t{1} << 24;

// The order statistics lo = floor(p) and hi = ceil(p) (0-based, hi = lo or lo + 1) and the
// interpolation weight frac of the q-quantile of n values, p = q (n - 1).
template <typename V>
struct Ranks {
  int64_t lo;
  int64_t hi;
  V frac;
};

// torch.quantile's arithmetic: p = V(q) * V(n - 1) rounded in the values' dtype V (float for
// fp32/half inputs), frac = p - floor(p) in V. Above kMaxTorchQuantileSize values p = q (n - 1) in
// fp64 and frac is rounded to V. n = 0 gives the ranks of n = 1 (the caller returns NaN).
template <typename V>
FASTRL_HOST_DEVICE Ranks<V> ranks(int64_t n, double q) {
  const int64_t last = n > 0 ? n - 1 : 0;
  if (n <= kMaxTorchQuantileSize) {
    const V p = static_cast<V>(q) * static_cast<V>(last);  // a product, nothing to contract
    const double pd = static_cast<double>(p);
    return Ranks<V>{static_cast<int64_t>(std::floor(pd)), static_cast<int64_t>(std::ceil(pd)),
                    p - std::floor(p)};
  }
  const double p = q * static_cast<double>(last);
  return Ranks<V>{static_cast<int64_t>(std::floor(p)), static_cast<int64_t>(std::ceil(p)),
                  static_cast<V>(p - std::floor(p))};
}

// Order-preserving unsigned keys of fp32 / fp64 values: a < b <=> key(a) < key(b) for non-NaN
// values; -0 takes the key of +0 (they compare equal) and every NaN the largest key (where
// torch.sort puts NaN). value_of inverts key_of (up to the sign of zero and NaN payloads).
template <typename V>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;  // the type of CUDA's 64-bit integer atomics
};

template <typename K, typename V>
FASTRL_HOST_DEVICE K bits_of(V v) {
  K bits;
  memcpy(&bits, &v, sizeof(V));  // a register move on the device
  return bits;
}

template <typename V>
FASTRL_HOST_DEVICE typename KeyOf<V>::type key_of(V v) {
  using K = typename KeyOf<V>::type;
  constexpr K kSign = K{1} << (8 * sizeof(K) - 1);
  if (v != v) return ~K{0};
  K bits = bits_of<K>(v);
  if (bits == kSign) bits = 0;  // -0 -> +0
  return (bits & kSign) != 0 ? ~bits : bits | kSign;
}

template <typename V>
FASTRL_HOST_DEVICE V value_of(typename KeyOf<V>::type key) {
  using K = typename KeyOf<V>::type;
  constexpr K kSign = K{1} << (8 * sizeof(K) - 1);
  const K bits = (key & kSign) != 0 ? key & ~kSign : ~key;
  V v;
  memcpy(&v, &bits, sizeof(V));
  return v;
}

// The radix select over the keys, most significant 8-bit digit first (shared by the CPU op and
// the CUDA kernels, so both walk the same passes).
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;

template <typename K>
FASTRL_HOST_DEVICE constexpr int num_passes() {
  return static_cast<int>(8 * sizeof(K)) / kDigitBits;
}
template <typename K>
FASTRL_HOST_DEVICE constexpr int pass_shift(int pass) {
  return static_cast<int>(8 * sizeof(K)) - kDigitBits * (pass + 1);
}
template <typename K>
FASTRL_HOST_DEVICE int digit_of(K key, int shift) {
  return static_cast<int>((key >> shift) & static_cast<K>(kBins - 1));
}
// Whether the digits of `key` above `shift` are those chosen so far (`prefix`, whose lower digits
// are still zero): the candidates of the pass at `shift`.
template <typename K>
FASTRL_HOST_DEVICE bool is_candidate(K key, K prefix, int shift) {
  const int high = shift + kDigitBits;
  return high >= static_cast<int>(8 * sizeof(K)) || (key >> high) == (prefix >> high);
}

// After the last pass (the lo-th key found, `rank` its rank among the `copies` values with that
// key): whether the hi-th value lies past those copies, i.e. is the least key above the lo-th.
FASTRL_HOST_DEVICE bool hi_is_next_key(int64_t lo, int64_t hi, uint64_t rank, uint64_t copies) {
  return hi != lo && rank + 1 >= copies;
}

}  // namespace quantile
}  // namespace fastrl
