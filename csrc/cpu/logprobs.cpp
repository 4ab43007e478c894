// CPU kernels of the log-prob family.
//
// A row is processed in blocks of kBlock elements: the block is converted to fp32 scaled logits
// in an L1-resident buffer (padded with -inf to a multiple of kLanes), its per-lane max is taken,
// the kLanes running states are rescaled once per block, and then every element adds
// exp(z - m) (and exp(z - m) (z - m) for the entropy) to its lane. Lane j holds the elements
// j, j + kLanes, ...; the lanes are merged in lane order at the end of the row. The lane count is
// a constant, not the SIMD width, and the loops over the lanes are plain elementwise loops that the
// compiler vectorizes for whatever ISA the translation unit is built for (baseline x86-64: SSE2);
// exp is a branch-free polynomial for arguments <= 0 (simd::exp_nonpositive, ~1.1 ulp) written
// so that it vectorizes.
// The result of a row therefore depends only on that row: not on the other rows, the thread count
// or the ISA (no FMA contraction: setup.py builds with -ffp-contract=off). Rows run in parallel.
// The logits are read from memory once per row (the block's second read hits L1).
//
// The row loops are templates over the lane type and run for the widest ISA the CPU supports
// (cpu/simd.h: about 4x faster forward than SSE2 at V = 32768); every ISA gives the same bits.
// -fno-trapping-math for this file only: lets GCC turn the selects of the exp and the lane loops
// into vector blends (it does not change any result: no program here inspects FP exception flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// The lane helpers (cpu/simd.h) take and return GCC vectors; they are always inlined into the
// target-attributed wrappers, so GCC's note about the ABI of vector returns does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/logprobs.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <vector>

namespace fastrl {
namespace cpu {
namespace {

using logprobs::SoftmaxState;

using namespace simd;  // NOLINT: the lane helpers are this file's vocabulary

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 1024;  // a multiple of kLanes

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
      const float scale = m[j] == mn ? 1.0f : exp_nonpositive<float>(m[j] - mn);
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
        const V e = exp_nonpositive<V>(d);
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
      const float p = exp_nonpositive<float>(z - row_lse);
      label_grad[k] = logprobs::grad_z_labels(z, p, row_lse, row_ent, glp, gent, glse, weight) * inv_t;
    }
    for (int64_t b = 0; b < a.vocab; b += kBlock) {
      const int64_t n = std::min(kBlock, a.vocab - b);
      const int64_t padded = load_block(x + b, n, inv_t, buf);
      for (int64_t i = 0; i < padded; i += kW) {  // logprobs::grad_z_labels (label_weight = 0) per lane
        const V z = load_lanes<V>(buf + i);
        const V p = exp_nonpositive<V>(z - row_lse);
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

FASTRL_CPU_ISA_VARIANTS(forward_rows)
FASTRL_CPU_ISA_VARIANTS(backward_rows)

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
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    FASTRL_CPU_ISA_CALL(forward_rows, args, begin, end);
  });
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
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    FASTRL_CPU_ISA_CALL(backward_rows, args, begin, end);
  });
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
