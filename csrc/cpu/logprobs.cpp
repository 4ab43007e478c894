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
// -fno-trapping-math for this file only: lets GCC turn the selects of fast_exp and the lane loops
// into vector blends (it does not change any result: no program here inspects FP exception flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "cpu/logprobs.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>

namespace fastrl {
namespace cpu {
namespace {

using logprobs::SoftmaxState;

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 1024;  // a multiple of kLanes

// exp(x), ~1 ulp, for x <= 88.37 (larger x return a large finite value, never reached here: the
// kernels only take exp of z - max z). x < -87.33 (e.g. -inf) gives 0, NaN gives NaN.
inline float fast_exp(float x) {
  constexpr float kLo = -87.33654f, kHi = 88.37626f;
  constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
  const bool nan = x != x;
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  xc = nan ? 0.0f : xc;
  const float fx = xc * kLog2e;
  const int32_t n = static_cast<int32_t>(fx + (fx < 0.0f ? -0.5f : 0.5f));  // round to nearest
  const float fn = static_cast<float>(n);
  float r = xc - fn * kC1;
  r = r - fn * kC2;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = y * scale;
  return nan ? x : (x < kLo ? 0.0f : e);
}

// buf[0, n) = float(x[i]) * inv_t, buf[n, round_up(n, kLanes)) = -inf; returns the padded length.
template <typename scalar_t>
inline int64_t load_block(const scalar_t* x, int64_t n, float inv_t, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * inv_t;
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t i = n; i < padded; ++i) buf[i] = -INFINITY;
  return padded;
}

template <typename scalar_t, bool kEntropy>
SoftmaxState row_state(const scalar_t* x, int64_t vocab, float inv_t, float* buf) {
  float m[kLanes], s[kLanes], t[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) {
    m[j] = -INFINITY;
    s[j] = 0.0f;
    t[j] = 0.0f;
  }
  for (int64_t b = 0; b < vocab; b += kBlock) {
    const int64_t padded = load_block(x + b, std::min(kBlock, vocab - b), inv_t, buf);
    float bm[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) bm[j] = buf[j];
    for (int64_t i = kLanes; i < padded; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) bm[j] = buf[i + j] > bm[j] ? buf[i + j] : bm[j];
    }
    float shift[kLanes];  // the lane's max, or 0 while the lane has only seen -inf
    for (int64_t j = 0; j < kLanes; ++j) {
      const float mn = bm[j] > m[j] ? bm[j] : m[j];
      const float scale = m[j] == mn ? 1.0f : fast_exp(m[j] - mn);
      const SoftmaxState r = logprobs::rescale({m[j], s[j], t[j]}, mn, scale);
      m[j] = r.m;
      s[j] = r.s;
      t[j] = r.t;
      shift[j] = mn == -INFINITY ? 0.0f : mn;
    }
    for (int64_t i = 0; i < padded; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const float d = buf[i + j] - shift[j];
        const float e = fast_exp(d);
        s[j] += e;
        if (kEntropy) t[j] += e * logprobs::clamp_diff(d);
      }
    }
  }
  SoftmaxState st = logprobs::state_empty();
  for (int64_t j = 0; j < kLanes; ++j) st = logprobs::merge(st, {m[j], s[j], t[j]});
  return st;
}

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 15) / vocab); }

}  // namespace

int64_t first_bad_label(const int64_t* labels, int64_t num_rows, int64_t vocab, int64_t ignore_index) {
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t y = labels[r];
    if (y != ignore_index && (y < 0 || y >= vocab)) return r;
  }
  return -1;
}

template <typename scalar_t>
int64_t logprobs_forward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                         int64_t num_rows, int64_t vocab, float inv_temperature,
                         int64_t ignore_index, float* logprobs, float* entropy, float* lse) {
  const int64_t bad = first_bad_label(labels, num_rows, vocab, ignore_index);
  if (bad >= 0) return bad;
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = logits + r * row_stride;
      const SoftmaxState st = entropy != nullptr
                                  ? row_state<scalar_t, true>(x, vocab, inv_temperature, buf)
                                  : row_state<scalar_t, false>(x, vocab, inv_temperature, buf);
      const float row_lse = logprobs::state_lse(st);
      lse[r] = row_lse;
      if (entropy != nullptr) entropy[r] = logprobs::state_entropy(st);
      const int64_t y = labels[r];
      logprobs[r] = y == ignore_index ? 0.0f : static_cast<float>(x[y]) * inv_temperature - row_lse;
    }
  });
  return -1;
}

template <typename scalar_t>
int64_t logprobs_backward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                          int64_t num_rows, int64_t vocab, float inv_temperature,
                          int64_t ignore_index, const float* lse, const float* entropy,
                          const float* g_lp, const float* g_ent, const float* g_lse,
                          scalar_t* grad_logits) {
  const int64_t bad = first_bad_label(labels, num_rows, vocab, ignore_index);
  if (bad >= 0) return bad;
  const float inv_t = inv_temperature;
  at::parallel_for(0, num_rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = logits + r * row_stride;
      scalar_t* out = grad_logits + r * vocab;
      const int64_t y = labels[r];
      const bool ignored = y == ignore_index;
      const float row_lse = lse[r];
      const float row_ent = g_ent != nullptr ? entropy[r] : 0.0f;
      const float glp = (g_lp != nullptr && !ignored) ? g_lp[r] : 0.0f;
      const float gent = g_ent != nullptr ? g_ent[r] : 0.0f;
      const float glse = g_lse != nullptr ? g_lse[r] : 0.0f;
      for (int64_t b = 0; b < vocab; b += kBlock) {
        const int64_t n = std::min(kBlock, vocab - b);
        load_block(x + b, n, inv_t, buf);
        for (int64_t i = 0; i < n; ++i) {
          const float z = buf[i];
          const float p = fast_exp(z - row_lse);
          buf[i] = logprobs::grad_z(z, p, row_lse, row_ent, glp, gent, glse, false) * inv_t;
        }
        for (int64_t i = 0; i < n; ++i) out[b + i] = static_cast<scalar_t>(buf[i]);
      }
      if (!ignored) {  // the label's element also gets the one-hot term
        const float z = static_cast<float>(x[y]) * inv_t;
        const float p = fast_exp(z - row_lse);
        out[y] = static_cast<scalar_t>(
            logprobs::grad_z(z, p, row_lse, row_ent, glp, gent, glse, true) * inv_t);
      }
    }
  });
  return -1;
}

#define FASTRL_INSTANTIATE(T)                                                                   \
  template int64_t logprobs_forward<T>(const T*, int64_t, const int64_t*, int64_t, int64_t,     \
                                       float, int64_t, float*, float*, float*);                 \
  template int64_t logprobs_backward<T>(const T*, int64_t, const int64_t*, int64_t, int64_t,    \
                                        float, int64_t, const float*, const float*, const float*, \
                                        const float*, const float*, T*);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(c10::Half)
FASTRL_INSTANTIATE(c10::BFloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cpu
}  // namespace fastrl
