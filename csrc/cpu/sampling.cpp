// CPU kernel of token sampling (the math and the kept set are defined in fastrl/sampling.h).
//
// Per row, no sort of the vocabulary:
//   1. one pass: max of z, NaN check;  2. one pass: e_j = expf(z_j - m) into a row buffer, raw mass;
//   3. top-k: the k-th largest z by a streaming filter: values >= the running k-th largest go to a
//      candidate buffer, which nth_element cuts back to k when full (for k << V almost nothing
//      passes the filter after the first cut), then one nth_element;
//   4. top-p: a histogram of the masses over bins of e (an eighth of an octave each) finds the bin
//      holding the threshold, then a weighted quickselect over that bin's values only;
//   5. the kept mass, then an inverse-CDF scan that stops at the sampled token.
// Masses are integer sums (exact), so nothing depends on the thread count; rows run in parallel.
#include "cpu/sampling.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>

namespace fastrl {
namespace cpu {
namespace {

using sampling::Thresholds;

// The k-th largest of z_j = float(x_j) * inv_t (1 <= k < vocab); cand holds min(vocab, 2k + 4096).
template <typename scalar_t>
float kth_largest(const scalar_t* x, int64_t vocab, float inv_t, int64_t k, float* cand) {
  const int64_t cap = std::min(vocab, 2 * k + 4096);
  int64_t n = 0;
  float cut = -INFINITY;  // the k-th largest seen so far: smaller values cannot be in the top k
  for (int64_t j = 0; j < vocab; ++j) {
    const float z = static_cast<float>(x[j]) * inv_t;
    if (z >= cut) {
      cand[n++] = z;
      if (n == cap) {
        std::nth_element(cand, cand + k - 1, cand + n, std::greater<float>());
        cut = cand[k - 1];
        n = k;
      }
    }
  }
  std::nth_element(cand, cand + k - 1, cand + n, std::greater<float>());
  return cand[k - 1];
}

// e >= 0 as an integer with the same order (its bits), and its bin: sign, exponent and 3 mantissa
// bits, so a bin spans an eighth of an octave (bins 0 .. 1016 for e in [0, 1]).
uint32_t bits_of(float e) {
  uint32_t b;
  std::memcpy(&b, &e, sizeof(b));
  return b;
}
constexpr int kBinShift = 20;
constexpr int kBins = (0x3f800000 >> kBinShift) + 1;

// The largest value v among a[0, n) (n >= 1, each with to_fixed(v) > 0) such that the masses of
// the a_i >= v, plus `above`, reach target (the whole set does). Reorders a. Quickselect: split on
// a median-of-3 pivot, keep the side that holds the answer (a sort past 64 rounds).
float quickselect_threshold(float* a, int64_t n, uint64_t above, double target) {
  for (int round = 0; round < 64 && n > 32; ++round) {
    const float lo = a[0], mid = a[n / 2], hi = a[n - 1];
    const float pivot = std::max(std::min(lo, mid), std::min(std::max(lo, mid), hi));
    uint64_t gt = 0, eq = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t w = sampling::to_fixed(a[i]);
      gt += a[i] > pivot ? w : 0;
      eq += a[i] == pivot ? w : 0;
    }
    int64_t m = 0;
    if (sampling::mass_reaches(above + gt, target)) {  // the threshold is above the pivot
      for (int64_t i = 0; i < n; ++i) {
        a[m] = a[i];
        m += a[i] > pivot;
      }
    } else if (sampling::mass_reaches(above + gt + eq, target)) {
      return pivot;
    } else {
      above += gt + eq;
      for (int64_t i = 0; i < n; ++i) {
        a[m] = a[i];
        m += a[i] < pivot;
      }
    }
    n = m;
  }
  std::sort(a, a + n, std::greater<float>());
  for (int64_t i = 0; i < n; ++i) {
    above += sampling::to_fixed(a[i]);
    if ((i + 1 == n || a[i + 1] != a[i]) && sampling::mass_reaches(above, target)) return a[i];
  }
  return a[n - 1];  // not reached: the whole set reaches the target
}

// The top-p threshold v_p over the values e[0, n) (the top-k set; to_fixed(e) = 0 ones are never
// the threshold): a histogram of the masses over the bins of e finds the bin holding v_p, then a
// quickselect over that bin's values only. Two passes over e. scratch holds n floats.
float top_p_threshold(const float* e, int64_t n, double target, float* scratch) {
  uint64_t hist[kBins] = {};
  for (int64_t i = 0; i < n; ++i) hist[bits_of(e[i]) >> kBinShift] += sampling::to_fixed(e[i]);
  uint64_t above = 0;
  int bin = kBins - 1;
  for (; bin > 0 && !sampling::mass_reaches(above + hist[bin], target); --bin) above += hist[bin];
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    scratch[m] = e[i];
    m += (bits_of(e[i]) >> kBinShift) == static_cast<uint32_t>(bin) && sampling::to_fixed(e[i]) > 0;
  }
  return quickselect_threshold(scratch, m, above, target);
}

struct Buffers {
  std::unique_ptr<float[]> e, cand, scratch;
  explicit Buffers(int64_t vocab) : e(new float[vocab]), cand(new float[vocab]), scratch(new float[vocab]) {}
};

template <typename scalar_t>
void sample_row(const scalar_t* x, int64_t vocab, double u, const sampling::RowParams& prm, Buffers& buf,
                int64_t* token, float* logprob, float* raw_logprob) {
  const float inv_t = sampling::inv_temperature(prm);
  float m = -INFINITY;
  bool any_nan = false;
  for (int64_t j = 0; j < vocab; ++j) {
    const float z = static_cast<float>(x[j]) * inv_t;
    m = z > m ? z : m;
    any_nan |= z != z;
  }
  if (!sampling::row_valid(m, any_nan)) {
    *token = -1;
    *logprob = *raw_logprob = NAN;
    return;
  }
  float* e = buf.e.get();
  uint64_t raw = 0;
  for (int64_t j = 0; j < vocab; ++j) {
    e[j] = std::exp(static_cast<float>(x[j]) * inv_t - m);
    raw += sampling::to_fixed(e[j]);
  }

  Thresholds th{-INFINITY, 0.0f, prm.min_p};
  if (prm.top_k < vocab) th.z_min = kth_largest(x, vocab, inv_t, prm.top_k, buf.cand.get());
  if (prm.top_p < 1.0) {
    const float* topk_e = e;  // the e of the top-k set (the whole row without top-k)
    int64_t n = vocab;
    uint64_t topk_mass = raw;
    if (th.z_min > -INFINITY) {
      float* cand = buf.cand.get();
      n = 0;
      topk_mass = 0;
      for (int64_t j = 0; j < vocab; ++j) {
        if (static_cast<float>(x[j]) * inv_t >= th.z_min) {
          cand[n++] = e[j];
          topk_mass += sampling::to_fixed(e[j]);
        }
      }
      topk_e = cand;
    }
    th.e_min = top_p_threshold(topk_e, n, sampling::top_p_target(topk_mass, prm.top_p), buf.scratch.get());
  }

  const bool truncated = sampling::truncates(th);
  auto kept_w = [&](int64_t j) -> uint64_t {
    const uint64_t w = sampling::to_fixed(e[j]);
    return !truncated || sampling::kept(static_cast<float>(x[j]) * inv_t, e[j], th) ? w : 0;
  };
  uint64_t kept_mass = raw;
  if (truncated) {
    kept_mass = 0;
    for (int64_t j = 0; j < vocab; ++j) kept_mass += kept_w(j);
  }
  const uint64_t target = sampling::sample_target(u, kept_mass);
  uint64_t prefix = 0;
  int64_t y = 0;
  for (; y < vocab; ++y) {  // kept_mass > target, so the scan stops inside the row
    prefix += kept_w(y);
    if (prefix > target) break;
  }
  const float zy = static_cast<float>(x[y]) * inv_t - m;
  *token = y;
  *logprob = sampling::token_logprob(zy, kept_mass);
  *raw_logprob = sampling::token_logprob(zy, raw);
}

}  // namespace

template <typename scalar_t>
int64_t sample_tokens(const scalar_t* logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                      const double* uniforms, const sampling::ParamSource& params, int64_t* tokens,
                      float* logprobs, float* raw_logprobs) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / vocab);
  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    Buffers buf(vocab);
    for (int64_t r = begin; r < end; ++r) {
      sample_row(logits + r * row_stride, vocab, uniforms[r], sampling::row_params(params, r), buf,
                 tokens + r, logprobs + r, raw_logprobs + r);
    }
  });
  for (int64_t r = 0; r < num_rows; ++r) {
    if (tokens[r] < 0) return r;
  }
  return -1;
}

#define FASTRL_INSTANTIATE(T)                                                                    \
  template int64_t sample_tokens<T>(const T*, int64_t, int64_t, int64_t, const double*,         \
                                    const sampling::ParamSource&, int64_t*, float*, float*);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(c10::Half)
FASTRL_INSTANTIATE(c10::BFloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cpu
}  // namespace fastrl
