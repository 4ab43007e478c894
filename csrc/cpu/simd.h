// SIMD lanes and runtime ISA dispatch shared by the CPU kernels (log-probs, credit, losses).
//
// The extension is built for baseline x86-64 (SSE2: 4 floats a vector; never -march=native). A
// kernel that is bound by arithmetic (exp, mostly) writes its inner loops once as a template over a
// lane type V: float (the baseline; GCC vectorizes plain loops of it for SSE2), or a GCC vector of
// 8 or 16 floats (VecF<W>::type) that FASTRL_CPU_ISA_VARIANTS instantiates inside wrappers compiled
// for AVX2 / AVX-512 with GCC target attributes. FASTRL_CPU_ISA_CALL picks the widest variant the
// CPU supports, once per process. Vector operators act elementwise with IEEE semantics and the
// translation units are built with -ffp-contract=off, so every variant runs the same operations in
// the same order per lane: the results are bitwise the same whatever the ISA. The environment
// variable FASTRL_CPU_ISA=baseline|avx2|avx512 (read once) caps the choice; the tests use it to run
// the baseline path on a machine with AVX.
//
// The helpers must be inlined into the ISA wrappers to be compiled for their ISA (GCC inlines
// default-target code into a wider target, not the reverse), hence FASTRL_CPU_INLINE everywhere.
// A translation unit using this header should add, before its includes,
//   #pragma GCC optimize("no-trapping-math")   (lets GCC turn the selects into vector blends)
//   #pragma GCC diagnostic ignored "-Wpsabi"    (vector returns of always-inlined helpers)
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // the fp32 <-> fp64 lane conversions below
#endif

#define FASTRL_CPU_INLINE inline __attribute__((always_inline))

namespace fastrl {
namespace cpu {
namespace simd {

template <int W>
struct VecF {
  typedef float type __attribute__((vector_size(4 * W)));
};

template <typename V>
struct LaneTraits {  // V: a VecF<W>::type
  static constexpr int kWidth = sizeof(V) / sizeof(float);
  typedef int32_t Int __attribute__((vector_size(sizeof(V))));
};
template <>
struct LaneTraits<float> {
  static constexpr int kWidth = 1;
  using Int = int32_t;
};

template <typename V>
FASTRL_CPU_INLINE V splat(float v) {
  if constexpr (LaneTraits<V>::kWidth == 1) {
    return v;
  } else {
    return V{} + v;  // 0 + v == v exactly for every finite v and infinities (and -0 is never splat)
  }
}

// cond ? a : b per lane (cond: a bool, or a vector comparison's all-ones / zero lanes).
template <typename M, typename V>
FASTRL_CPU_INLINE V select(M cond, V a, V b) {
  return cond ? a : b;
}

template <typename V>
FASTRL_CPU_INLINE typename LaneTraits<V>::Int trunc_to_int(V v) {
  if constexpr (LaneTraits<V>::kWidth == 1) {
    return static_cast<int32_t>(v);
  } else {
    return __builtin_convertvector(v, typename LaneTraits<V>::Int);
  }
}

template <typename V, typename I>
FASTRL_CPU_INLINE V int_to_float(I n) {
  if constexpr (LaneTraits<V>::kWidth == 1) {
    return static_cast<float>(n);
  } else {
    return __builtin_convertvector(n, V);
  }
}

template <typename V, typename I>
FASTRL_CPU_INLINE V bits_to_float(I bits) {
  V r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

// ---- helpers for a vector V only (a VecF<W>::type, W >= 4)

// The lanes of V in fp64: two vectors of W / 2 doubles, lanes [0, W/2) and [W/2, W) (each as wide
// as V: a generic vector of W doubles would exceed the ISA's registers, which GCC handles badly).
template <typename V>
struct Doubles {
  typedef double Half __attribute__((vector_size(sizeof(V))));
  Half lo, hi;
};
template <typename V>
FASTRL_CPU_INLINE Doubles<V> operator+(Doubles<V> a, Doubles<V> b) {
  return {a.lo + b.lo, a.hi + b.hi};
}
template <typename V>
FASTRL_CPU_INLINE Doubles<V> operator*(Doubles<V> a, Doubles<V> b) {
  return {a.lo * b.lo, a.hi * b.hi};
}
template <typename V>
FASTRL_CPU_INLINE Doubles<V> operator*(Doubles<V> a, double s) {
  return {a.lo * s, a.hi * s};
}

// v's lanes in fp64 (exact), and fp64 lanes rounded to fp32. GCC 12 lowers the generic vector
// conversions of float <-> double badly (128-bit pieces, or element by element on SSE2), hence the
// x86 versions for 4 lanes (SSE2, the baseline) and 8 lanes (AVX2 code only).
template <typename V>
FASTRL_CPU_INLINE Doubles<V> to_double(V v) {
  typedef float HalfF __attribute__((vector_size(sizeof(V) / 2)));
  HalfF lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  typedef typename Doubles<V>::Half D;
  return {__builtin_convertvector(lo, D), __builtin_convertvector(hi, D)};
}
template <typename V>
FASTRL_CPU_INLINE V to_float(Doubles<V> d) {
  typedef float HalfF __attribute__((vector_size(sizeof(V) / 2)));
  const HalfF lo = __builtin_convertvector(d.lo, HalfF), hi = __builtin_convertvector(d.hi, HalfF);
  V r;
  std::memcpy(&r, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&r) + sizeof(lo), &hi, sizeof(hi));
  return r;
}
#if defined(__x86_64__) && defined(__GNUC__)
template <>
FASTRL_CPU_INLINE Doubles<VecF<4>::type> to_double(VecF<4>::type v) {
  typedef Doubles<VecF<4>::type>::Half D;
  const __m128 x = (__m128)v;
  return {(D)_mm_cvtps_pd(x), (D)_mm_cvtps_pd(_mm_movehl_ps(x, x))};
}
template <>
FASTRL_CPU_INLINE VecF<4>::type to_float(Doubles<VecF<4>::type> d) {
  return (VecF<4>::type)_mm_movelh_ps(_mm_cvtpd_ps((__m128d)d.lo), _mm_cvtpd_ps((__m128d)d.hi));
}
// (Not always_inline: an AVX2 function inlines only into AVX2 code, which its callers become once
// they are inlined into an AVX2 wrapper.)
template <>
inline __attribute__((target("avx2"))) Doubles<VecF<8>::type> to_double(VecF<8>::type v) {
  typedef Doubles<VecF<8>::type>::Half D;
  const __m256 x = (__m256)v;
  return {(D)_mm256_cvtps_pd(_mm256_castps256_ps128(x)), (D)_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))};
}
template <>
inline __attribute__((target("avx2"))) VecF<8>::type to_float(Doubles<VecF<8>::type> d) {
  const __m128 lo = _mm256_cvtpd_ps((__m256d)d.lo), hi = _mm256_cvtpd_ps((__m256d)d.hi);
  return (VecF<8>::type)_mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
#endif

// clamp(x, lo, hi) keeping NaN (credit::clamp_nan per lane) and whether lo <= x <= hi (credit::in_range).
template <typename V>
FASTRL_CPU_INLINE V clamp_nan(V x, float lo, float hi) {
  return select(x < lo, splat<V>(lo), select(x > hi, splat<V>(hi), x));
}
template <typename V>
FASTRL_CPU_INLINE typename LaneTraits<V>::Int in_range(V x, float lo, float hi) {
  return (x >= lo) & (x <= hi);
}

// fastrl::nan_min / nan_max per lane: a NaN in b is taken, a NaN in a kept.
template <typename V>
FASTRL_CPU_INLINE V nan_min(V a, V b) {
  return select(b != b, b, select(b < a, b, a));
}
template <typename V>
FASTRL_CPU_INLINE V nan_max(V a, V b) {
  return select(b != b, b, select(b > a, b, a));
}

// |x| per lane: the sign bit cleared (as fabsf, NaN and -0 included).
template <typename V>
FASTRL_CPU_INLINE V abs_lanes(V x) {
  typename LaneTraits<V>::Int bits;
  std::memcpy(&bits, &x, sizeof(x));
  return bits_to_float<V>(bits & 0x7fffffff);
}

template <typename V>
FASTRL_CPU_INLINE V load_lanes(const float* p) {
  V r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}

template <typename V>
FASTRL_CPU_INLINE void store_lanes(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// exp(x), ~1 ulp: a branch-free Cephes-style polynomial that vectorizes. x < -87.34 (-inf
// included) gives 0, x > 88.72 gives +inf, NaN gives NaN. kBounded: the caller guarantees
// x <= 88.37 (e.g. the softmax's exp(z - max z) <= 1), which saves the overflow handling (three
// selects, ~15% of the polynomial); the results are the same bits where both apply.
template <typename V, bool kBounded = false>
FASTRL_CPU_INLINE V fast_exp(V x) {
  using I = typename LaneTraits<V>::Int;
  constexpr float kLo = -87.33654f, kHi = kBounded ? 88.37626f : 88.7228f;
  constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
  const auto nan = x != x;
  V xc = select(x < kLo, splat<V>(kLo), x);
  xc = select(xc > kHi, splat<V>(kHi), xc);
  xc = select(nan, splat<V>(0.0f), xc);
  const V fx = xc * kLog2e;
  const I n = trunc_to_int(fx + select(fx < 0.0f, splat<V>(-0.5f), splat<V>(0.5f)));  // round to nearest
  const V fn = int_to_float<V>(n);
  V r = xc - fn * kC1;
  r = r - fn * kC2;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  if constexpr (kBounded) {
    const V e = y * bits_to_float<V>((n + 127) << 23);
    return select(nan, x, select(x < kLo, splat<V>(0.0f), e));
  } else {
    // 2^n as float bits; n = 128 (x above ~88.03) is 2^127 * 2 so that exp stays finite up to FLT_MAX
    const auto top = n > 127;
    const V scale = bits_to_float<V>((select(top, n - 1, n) + 127) << 23);
    const V e = select(top, y * 2.0f, y) * scale;
    return select(nan, x, select(x < kLo, splat<V>(0.0f), select(x > kHi, splat<V>(INFINITY), e)));
  }
}

// exp(x) for the softmax's x = z - max z <= 0 (valid up to x = 88.37), ~1.1 ulp, fewer operations
// than fast_exp (the log-prob kernels' forward and backward are bound by it): the rounding to
// nearest of x log2(e) by adding 1.5 * 2^23 (whose bits then hold n), a one-constant reduction
// r = x - n ln 2 (its error grows with |x|, but so does the smallness of exp(x): a softmax sum's
// error stays ~1 ulp of the sum), and a degree-6 polynomial (max error 6.5e-8 relative,
// fitted for fp32 evaluation). x < -87.34 (-inf included) gives 0; NaN gives NaN (it flows through
// the arithmetic: nothing selects it away). The exponent bits are formed in unsigned arithmetic,
// so the lanes that the final select discards (x below the range, NaN) never overflow a signed int.
template <typename V>
FASTRL_CPU_INLINE V exp_nonpositive(V x) {
  constexpr float kLo = -87.33654f, kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: t = x log2(e) + kRound holds n in its low bits
  constexpr uint32_t kRoundBits = 0x4b400000u;
  const V t = x * kLog2e + kRound;
  const V n = t - kRound;
  const V r = x - n * kLn2;
  V p = splat<V>(1.3814610429108143e-3f);
  p = p * r + 8.368710055947304e-3f;
  p = p * r + 4.166838899254799e-2f;
  p = p * r + 1.666652113199234e-1f;
  p = p * r + 4.999999403953552e-1f;
  const V y = p * (r * r) + r + 1.0f;
  if constexpr (LaneTraits<V>::kWidth == 1) {
    uint32_t bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = (bits - kRoundBits + 127u) << 23;  // 2^n
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < kLo ? 0.0f : y * scale;
  } else {
    typedef uint32_t U __attribute__((vector_size(sizeof(V))));
    U bits;
    std::memcpy(&bits, &t, sizeof(bits));
    bits = (bits - kRoundBits + 127u) << 23;
    return select(x < kLo, splat<V>(0.0f), y * bits_to_float<V>(bits));
  }
}

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest ISA the CPU (and OS) supports, capped by FASTRL_CPU_ISA when set.
inline Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    best = Isa::kAvx512;
  }
#endif
  const char* cap = std::getenv("FASTRL_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  Isa limit;
  if (std::strcmp(cap, "baseline") == 0) {
    limit = Isa::kBaseline;
  } else if (std::strcmp(cap, "avx2") == 0) {
    limit = Isa::kAvx2;
  } else if (std::strcmp(cap, "avx512") == 0) {
    limit = Isa::kAvx512;
  } else {
    throw std::invalid_argument(std::string("fastrl: FASTRL_CPU_ISA must be baseline, avx2 or avx512, got '") +
                                cap + "'");
  }
  return best < limit ? best : limit;
}

// Detected once per process (an inline function's static: one instance across translation units).
inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace simd
}  // namespace cpu
}  // namespace fastrl

// FASTRL_CPU_ISA_VARIANTS(impl) defines impl_avx2(args...) and impl_avx512(args...): the function
// template impl<V, ...>(args...) instantiated with 8 / 16 float lanes inside wrappers compiled for
// AVX2 / AVX-512 (impl's other template parameters are deduced from the arguments).
// FASTRL_CPU_ISA_CALL(impl, args...) calls the variant of the process's ISA (impl<float> for the
// baseline). Only GCC/Clang on x86-64 get the wide variants.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTRL_TARGET_AVX2 __attribute__((target("avx2")))
// GCC's generic tuning prefers 256-bit vectors even with AVX-512; ask for the full width.
#define FASTRL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")))
#define FASTRL_CPU_ISA_VARIANTS(impl)                                                  \
  template <typename... Args>                                                          \
  FASTRL_TARGET_AVX2 void impl##_avx2(Args... args) {                                  \
    impl<::fastrl::cpu::simd::VecF<8>::type>(args...);                                 \
  }                                                                                    \
  template <typename... Args>                                                          \
  FASTRL_TARGET_AVX512 void impl##_avx512(Args... args) {                              \
    impl<::fastrl::cpu::simd::VecF<16>::type>(args...);                                \
  }
#define FASTRL_CPU_ISA_CALL(impl, ...)                                                 \
  (::fastrl::cpu::simd::cpu_isa() == ::fastrl::cpu::simd::Isa::kAvx512                 \
       ? impl##_avx512(__VA_ARGS__)                                                    \
       : (::fastrl::cpu::simd::cpu_isa() == ::fastrl::cpu::simd::Isa::kAvx2            \
              ? impl##_avx2(__VA_ARGS__)                                               \
              : impl<float>(__VA_ARGS__)))
#else
#define FASTRL_CPU_ISA_VARIANTS(impl)
#define FASTRL_CPU_ISA_CALL(impl, ...) impl<float>(__VA_ARGS__)
#endif
