// CPU kernels of the log-prob family.
//
// A row is processed in blocks of kBlock elements: the block is converted to fp32 scaled logits
// in an L1-resident buffer (padded with -inf to a multiple of kLanes), its per-lane max is taken,
// the kLanes running states are rescaled once per block, and then every element adds
// exp(z - m) (and exp(z - m) (z - m) for the entropy) to its lane. Lane j holds the elements
// j, j + kLanes, ...; the lanes are merged in lane order at the end of the row. The lane count is
// a constant, not the SIMD width, and the loops over the lanes are plain elementwise loops that the
// compiler vectorizes for whatever ISA the translation unit is built for (baseline x86-64: SSE2);
// exp is a branch-free Cephes-style polynomial (fast_exp, ~1 ulp) written so that it vectorizes.
// The result of a row therefore depends only on that row: not on the other rows, the thread count
// or the ISA (no FMA contraction: setup.py builds with -ffp-contract=off). Rows run in parallel.
// The logits are read from memory once per row (the block's second read hits L1).
//
// ISA dispatch: the extension is built for baseline x86-64 (SSE2, 4 floats a vector), where the
// exp polynomial is the bottleneck. The row loops are therefore templates over the lane type
// (float, or a GCC vector of 8 or 16 floats), instantiated for AVX2 and AVX-512 in thin wrappers
// with GCC target attributes, and the widest variant the CPU supports is picked once at runtime
// (about 4x faster forward at V = 32768). The variants run the same IEEE operations in the same
// order per lane (no FMA, no reassociation), so they give bitwise-identical results;
// FASTRL_CPU_ISA=baseline|avx2|avx512 (read once) caps the choice, which is how the tests run the
// baseline path on a machine with AVX.
// -fno-trapping-math for this file only: lets GCC turn the selects of fast_exp and the lane loops
// into vector blends (it does not change any result: no program here inspects FP exception flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// The lane helpers below take and return GCC vectors; they are always inlined into the
// target-attributed wrappers, so GCC's note about the ABI of vector returns does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/logprobs.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastrl {
namespace cpu {
namespace {

using logprobs::SoftmaxState;

// Forced inlining: the row loops and their helpers must be inlined into each ISA wrapper below to be
// vectorized for that ISA (GCC inlines default-target code into a wider target, not the reverse).
#define FASTRL_CPU_INLINE inline __attribute__((always_inline))

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 1024;  // a multiple of kLanes

// Lane arithmetic written once for V = float (the baseline, which GCC vectorizes for SSE2 across
// the lanes) and for V = a GCC vector of floats (the AVX2 / AVX-512 paths, which spell out the
// vectors because GCC does not vectorize the lane loops reliably inside target-attributed code).
// Vector operators act elementwise with IEEE semantics, so both give the same bits per lane.
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
    return V{} + v;  // 0 + v == v exactly for every constant used here
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

// exp(x), ~1 ulp, for x <= 88.37 (larger x return a large finite value, never reached here: the
// kernels only take exp of z - max z). x < -87.33 (e.g. -inf) gives 0, NaN gives NaN.
template <typename V>
FASTRL_CPU_INLINE V fast_exp(V x) {
  using I = typename LaneTraits<V>::Int;
  constexpr float kLo = -87.33654f, kHi = 88.37626f;
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
  const V scale = bits_to_float<V>((n + 127) << 23);
  const V e = y * scale;
  return select(nan, x, select(x < kLo, splat<V>(0.0f), e));
}

// logprobs::clamp_diff per lane.
template <typename V>
FASTRL_CPU_INLINE V clamp_diff(V d) {
  return select(d < -3.402823466e38f, splat<V>(-3.402823466e38f), d);
}

// buf[0, n) = float(x[i]) * inv_t, buf[n, round_up(n, kLanes)) = -inf; returns the padded length.
template <typename scalar_t>
FASTRL_CPU_INLINE int64_t load_block(const scalar_t* x, int64_t n, float inv_t, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * inv_t;
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = n; i < padded; ++i) buf[i] = -INFINITY;
  return padded;
}

// The softmax state of a row; the kLanes lanes are handled as kLanes / width values of type V.
template <typename V, typename scalar_t, bool kEntropy>
FASTRL_CPU_INLINE SoftmaxState row_state(const scalar_t* x, int64_t vocab, float inv_t, float* buf) {
  constexpr int64_t kW = LaneTraits<V>::kWidth, kVecs = kLanes / kW;
  static_assert(kLanes % kW == 0, "the lane count must be a multiple of the vector width");
  float m[kLanes], s[kLanes], t[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    m[j] = -INFINITY;
    s[j] = 0.0f;
    t[j] = 0.0f;
  }
  for (int64_t b = 0; b < vocab; b += kBlock) {
    const int64_t padded = load_block(x + b, std::min(kBlock, vocab - b), inv_t, buf);
    V bm[kVecs];
    for (int64_t k = 0; k < kVecs; ++k) bm[k] = load_lanes<V>(buf + k * kW);
    for (int64_t i = kLanes; i < padded; i += kLanes) {
      for (int64_t k = 0; k < kVecs; ++k) {
        const V v = load_lanes<V>(buf + i + k * kW);
        bm[k] = select(v > bm[k], v, bm[k]);
      }
    }
    float block_max[kLanes], shift[kLanes];  // shift: the lane's max, or 0 while it has only seen -inf
    for (int64_t k = 0; k < kVecs; ++k) store_lanes(block_max + k * kW, bm[k]);
    for (int64_t j = 0; j < kLanes; ++j) {
      const float mn = block_max[j] > m[j] ? block_max[j] : m[j];
      const float scale = m[j] == mn ? 1.0f : fast_exp(m[j] - mn);
      const SoftmaxState r = logprobs::rescale({m[j], s[j], t[j]}, mn, scale);
      m[j] = r.m;
      s[j] = r.s;
      t[j] = r.t;
      shift[j] = mn == -INFINITY ? 0.0f : mn;
    }
    V vs[kVecs], vt[kVecs], vshift[kVecs];
    for (int64_t k = 0; k < kVecs; ++k) {
      vs[k] = load_lanes<V>(s + k * kW);
      vt[k] = load_lanes<V>(t + k * kW);
      vshift[k] = load_lanes<V>(shift + k * kW);
    }
    for (int64_t i = 0; i < padded; i += kLanes) {
      for (int64_t k = 0; k < kVecs; ++k) {
        const V d = load_lanes<V>(buf + i + k * kW) - vshift[k];
        const V e = fast_exp(d);
        vs[k] += e;
        if (kEntropy) vt[k] += e * clamp_diff(d);
      }
    }
    for (int64_t k = 0; k < kVecs; ++k) {
      store_lanes(s + k * kW, vs[k]);
      store_lanes(t + k * kW, vt[k]);
    }
  }
  SoftmaxState st = logprobs::state_empty();
  for (int64_t j = 0; j < kLanes; ++j) st = logprobs::merge(st, {m[j], s[j], t[j]});
  return st;
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 15) / vocab); }

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* logits;
  int64_t row_stride;
  const int64_t* labels;
  int64_t num_labels, vocab;
  float inv_t;
  int64_t ignore_index;
  float *logprobs, *entropy, *lse;
};

template <typename V, typename scalar_t>
FASTRL_CPU_INLINE void forward_rows(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  alignas(64) float buf[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = a.logits + r * a.row_stride;
    const SoftmaxState st = a.entropy != nullptr ? row_state<V, scalar_t, true>(x, a.vocab, a.inv_t, buf)
                                                 : row_state<V, scalar_t, false>(x, a.vocab, a.inv_t, buf);
    const float row_lse = logprobs::state_lse(st);
    a.lse[r] = row_lse;
    if (a.entropy != nullptr) a.entropy[r] = logprobs::state_entropy(st);
    for (int64_t k = r * a.num_labels; k < (r + 1) * a.num_labels; ++k) {
      const int64_t y = a.labels[k];
      a.logprobs[k] = y == a.ignore_index ? 0.0f : static_cast<float>(x[y]) * a.inv_t - row_lse;
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* logits;
  int64_t row_stride;
  const int64_t* labels;
  int64_t num_labels, vocab;
  float inv_t;
  int64_t ignore_index;
  const float *lse, *entropy, *g_lp, *g_ent, *g_lse;
  scalar_t* grad_logits;
  int64_t grad_row_stride;
};

template <typename V, typename scalar_t>
FASTRL_CPU_INLINE void backward_rows(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  constexpr int64_t kW = LaneTraits<V>::kWidth;
  alignas(64) float buf[kBlock];
  const float inv_t = a.inv_t;
  const int64_t K = a.num_labels;
  std::vector<float> label_grad(K);  // the labels' elements, computed before the row is overwritten
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = a.logits + r * a.row_stride;
    scalar_t* out = a.grad_logits + r * a.grad_row_stride;
    const int64_t* y = a.labels + r * K;
    const float* g = a.g_lp != nullptr ? a.g_lp + r * K : nullptr;
    const float row_lse = a.lse[r];
    const float row_ent = a.g_ent != nullptr ? a.entropy[r] : 0.0f;
    float glp = 0.0f;  // sum of the log-prob gradients of the row's labels, in label order
    for (int64_t k = 0; k < K; ++k) glp += (g != nullptr && y[k] != a.ignore_index) ? g[k] : 0.0f;
    const float gent = a.g_ent != nullptr ? a.g_ent[r] : 0.0f;
    const float glse = a.g_lse != nullptr ? a.g_lse[r] : 0.0f;
    for (int64_t k = 0; k < K; ++k) {  // one-hot weight of y[k]: the g of every label equal to it
      if (y[k] == a.ignore_index) continue;
      float weight = 0.0f;
      for (int64_t k2 = 0; k2 < K; ++k2) weight += (g != nullptr && y[k2] == y[k]) ? g[k2] : 0.0f;
      const float z = static_cast<float>(x[y[k]]) * inv_t;
      const float p = fast_exp(z - row_lse);
      label_grad[k] = logprobs::grad_z_labels(z, p, row_lse, row_ent, glp, gent, glse, weight) * inv_t;
    }
    for (int64_t b = 0; b < a.vocab; b += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - b);
      const int64_t padded = load_block(x + b, n, inv_t, buf);
      for (int64_t i = 0; i < padded; i += kW) {  // logprobs::grad_z_labels (label_weight = 0) per lane
        const V z = load_lanes<V>(buf + i);
        const V p = fast_exp(z - row_lse);
        const V coef = (glp - glse) + gent * (clamp_diff(z - row_lse) + row_ent);
        const V p_coef = select(p == 0.0f, splat<V>(0.0f), p * coef);
        store_lanes(buf + i, (0.0f - p_coef) * inv_t);
      }
      for (int64_t i = 0; i < n; ++i) out[b + i] = static_cast<scalar_t>(buf[i]);
    }
    for (int64_t k = 0; k < K; ++k) {  // the labels' elements also get their one-hot terms
      if (y[k] != a.ignore_index) out[y[k]] = static_cast<scalar_t>(label_grad[k]);
    }
  }
}

// The same row loops compiled for wider ISAs (see the top of the file). Only GCC/Clang on x86-64.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTRL_CPU_DISPATCH 1
#define FASTRL_TARGET_AVX2 __attribute__((target("avx2")))
// GCC's generic tuning prefers 256-bit vectors even with AVX-512; ask for the full width.
#define FASTRL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,prefer-vector-width=512")))

template <typename scalar_t>
FASTRL_TARGET_AVX2 void forward_rows_avx2(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_rows<VecF<8>::type>(a, begin, end);
}
template <typename scalar_t>
FASTRL_TARGET_AVX512 void forward_rows_avx512(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  forward_rows<VecF<16>::type>(a, begin, end);
}
template <typename scalar_t>
FASTRL_TARGET_AVX2 void backward_rows_avx2(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  backward_rows<VecF<8>::type>(a, begin, end);
}
template <typename scalar_t>
FASTRL_TARGET_AVX512 void backward_rows_avx512(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  backward_rows<VecF<16>::type>(a, begin, end);
}
#endif

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest ISA the CPU (and OS) supports, capped by FASTRL_CPU_ISA when set.
Isa detect_isa() {
  Isa best = Isa::kBaseline;
#ifdef FASTRL_CPU_DISPATCH
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
  return std::min(best, limit);
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

template <typename Args>
using RowsFn = void (*)(const Args&, int64_t, int64_t);

}  // namespace

int64_t first_bad_label(const int64_t* labels, int64_t num_labels, int64_t vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < num_labels; ++i) {
    const int64_t y = labels[i];
    if (y != ignore_index && (y < 0 || y >= vocab)) return i;
  }
  return -1;
}

template <typename scalar_t>
int64_t logprobs_forward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                         int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_temperature,
                         int64_t ignore_index, float* logprobs, float* entropy, float* lse) {
  const int64_t bad = first_bad_label(labels, num_rows * num_labels, vocab, ignore_index);
  if (bad >= 0) return bad;
  const ForwardArgs<scalar_t> args{logits, row_stride, labels, num_labels, vocab, inv_temperature,
                                   ignore_index, logprobs, entropy, lse};
  RowsFn<ForwardArgs<scalar_t>> rows = forward_rows<float, scalar_t>;
#ifdef FASTRL_CPU_DISPATCH
  if (cpu_isa() == Isa::kAvx2) rows = forward_rows_avx2<scalar_t>;
  if (cpu_isa() == Isa::kAvx512) rows = forward_rows_avx512<scalar_t>;
#endif
  at::parallel_for(0, num_rows, grain_rows(vocab),
                   [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  return -1;
}

template <typename scalar_t>
int64_t logprobs_backward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                          int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_temperature,
                          int64_t ignore_index, const float* lse, const float* entropy,
                          const float* g_lp, const float* g_ent, const float* g_lse,
                          scalar_t* grad_logits, int64_t grad_row_stride) {
  const int64_t bad = first_bad_label(labels, num_rows * num_labels, vocab, ignore_index);
  if (bad >= 0) return bad;
  const BackwardArgs<scalar_t> args{logits, row_stride, labels, num_labels, vocab, inv_temperature,
                                    ignore_index, lse, entropy, g_lp, g_ent, g_lse, grad_logits,
                                    grad_row_stride};
  RowsFn<BackwardArgs<scalar_t>> rows = backward_rows<float, scalar_t>;
#ifdef FASTRL_CPU_DISPATCH
  if (cpu_isa() == Isa::kAvx2) rows = backward_rows_avx2<scalar_t>;
  if (cpu_isa() == Isa::kAvx512) rows = backward_rows_avx512<scalar_t>;
#endif
  at::parallel_for(0, num_rows, grain_rows(vocab),
                   [&](int64_t begin, int64_t end) { rows(args, begin, end); });
  return -1;
}

#define FASTRL_INSTANTIATE(T)                                                                    \
  template int64_t logprobs_forward<T>(const T*, int64_t, const int64_t*, int64_t, int64_t,      \
                                       int64_t, float, int64_t, float*, float*, float*);         \
  template int64_t logprobs_backward<T>(const T*, int64_t, const int64_t*, int64_t, int64_t,     \
                                        int64_t, float, int64_t, const float*, const float*,     \
                                        const float*, const float*, const float*, T*, int64_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(c10::Half)
FASTRL_INSTANTIATE(c10::BFloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cpu
}  // namespace fastrl
