// CPU kernels of the token-level credit-assignment family (see cpu/credit.h).
//
// gae / discounted_returns: rows in parallel (at::parallel_for), each row walked once backwards
// applying the affine steps of fastrl/credit.h in verl's order: one streaming pass over the inputs
// and outputs. masked_moments: fixed chunks summarized in parallel and merged in chunk order, so
// the result is bitwise the same whatever the thread count.
//
// kl_penalty(_grad) of the exp-based estimator (k3) on fp32 arithmetic is bound by exp: its element
// loops are templates over SIMD lanes with cpu/simd.h's fast_exp, run for the widest ISA the CPU
// has; every ISA gives the same bits (same IEEE operations per lane, no FMA). The other estimators
// are a few exact operations that the compiler vectorizes as they are.
// -fno-trapping-math lets GCC turn the lane selects into blends (no result changes: nothing here
// reads FP exception flags); the lane helpers are always inlined, so GCC's vector-ABI note is moot.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/credit.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

namespace fastrl {
namespace cpu {
namespace {

using credit::Affine;

// 1 / 0 for a 0/1 mask value, -1 for anything else (NaN included).
template <typename mask_t>
inline int mask_bit(mask_t m) {
  const double x = static_cast<double>(m);
  return x == 1.0 ? 1 : (x == 0.0 ? 0 : -1);
}
template <>
inline int mask_bit<bool>(bool m) {
  return m ? 1 : 0;
}

inline void record_min(std::atomic<int64_t>& bad, int64_t i) {
  int64_t cur = bad.load();
  while ((cur < 0 || i < cur) && !bad.compare_exchange_weak(cur, i)) {
  }
}

inline int64_t row_begin(const Rows& rows, int64_t b) {
  return rows.cu_seqlens ? rows.cu_seqlens[b] : b * rows.row_len;
}
inline int64_t row_end(const Rows& rows, int64_t b) {
  return rows.cu_seqlens ? rows.cu_seqlens[b + 1] : (b + 1) * rows.row_len;
}

// Grain of the row loop: about 64k tokens per task.
inline int64_t row_grain(const Rows& rows) {
  const int64_t n = rows.cu_seqlens ? rows.cu_seqlens[rows.num_rows] : rows.num_rows * rows.row_len;
  const int64_t avg = rows.num_rows > 0 ? std::max<int64_t>(1, n / rows.num_rows) : 1;
  return std::max<int64_t>(1, (int64_t{1} << 16) / avg);
}

constexpr int64_t kChunk = int64_t{1} << 16;  // masked_moments chunk (fixed: determinism)

// credit::Moments of x[begin, end) over the valid tokens, two passes in fp64. Called right after a
// scan wrote the row (still in cache): the fused whitening's statistics need no pass of their own.
template <typename acc_t, typename mask_t>
credit::Moments row_moments_of(const acc_t* x, const mask_t* mask, int64_t begin, int64_t end) {
  double count = 0.0, sum = 0.0, m2 = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    if (mask_bit(mask[i]) == 1) {
      count += 1.0;
      sum += static_cast<double>(x[i]);
    }
  }
  const double mean = count > 0.0 ? sum / count : 0.0;
  for (int64_t i = begin; i < end; ++i) {
    if (mask_bit(mask[i]) == 1) {
      const double d = static_cast<double>(x[i]) - mean;
      m2 += d * d;
    }
  }
  return credit::Moments{count, mean, m2};
}

// ------------------------------------------------------------- k3 KL estimators on SIMD lanes
// credit::kl_value / kl_grad of KlKind::kK3 in fp32 per lane (V: float or a simd::VecF vector),
// the same operations in the same order, with simd::fast_exp (~1 ulp) in place of expf.

using simd::LaneTraits;
using simd::fast_exp;
using simd::select;
using simd::splat;

template <typename V>
FASTRL_CPU_INLINE V clamp_lanes(V x, float lo, float hi) {  // credit::clamp_nan: NaN kept
  return select(x < lo, splat<V>(lo), select(x > hi, splat<V>(hi), x));
}

template <typename V>
FASTRL_CPU_INLINE auto in_range_lanes(V x, float lo, float hi) {  // credit::in_range
  return (x >= lo) & (x <= hi);
}

template <credit::KlConvention C, typename V>
FASTRL_CPU_INLINE V k3_value(V logp, V ref) {
  if constexpr (C == credit::KlConvention::kVerl) {
    const V kl = clamp_lanes(ref - logp, -20.0f, 20.0f);
    return clamp_lanes((fast_exp(kl) - kl) - 1.0f, -10.0f, 10.0f);
  } else {
    const V x = -(logp - ref);
    const V y = (fast_exp(x) - 1.0f) - x;
    return C == credit::KlConvention::kOpenRLHF ? clamp_lanes(y, -10.0f, 10.0f) : y;
  }
}

template <credit::KlConvention C, typename V>
FASTRL_CPU_INLINE V k3_grad(V logp, V ref) {
  if constexpr (C == credit::KlConvention::kVerl) {
    const V raw = ref - logp;
    const V kl = clamp_lanes(raw, -20.0f, 20.0f);
    const V e = fast_exp(kl);
    const V v = (e - kl) - 1.0f;
    return select(in_range_lanes(raw, -20.0f, 20.0f) & in_range_lanes(v, -10.0f, 10.0f), 1.0f - e,
                  splat<V>(0.0f));
  } else {
    const V x = -(logp - ref);
    const V e = fast_exp(x);
    if constexpr (C == credit::KlConvention::kOpenRLHFUnclamped) return 1.0f - e;
    return select(in_range_lanes((e - 1.0f) - x, -10.0f, 10.0f), 1.0f - e, splat<V>(0.0f));
  }
}

// W consecutive elements of p as fp32 lanes, and back (static_cast per element, as the scalar path).
template <typename V, typename T>
FASTRL_CPU_INLINE V load_f32(const T* p) {
  if constexpr (std::is_same<T, float>::value) {
    return simd::load_lanes<V>(p);
  } else {
    float t[LaneTraits<V>::kWidth];
    for (int j = 0; j < LaneTraits<V>::kWidth; ++j) t[j] = static_cast<float>(p[j]);
    return simd::load_lanes<V>(t);
  }
}
template <typename V, typename T>
FASTRL_CPU_INLINE void store_f32(T* p, V v) {
  if constexpr (std::is_same<T, float>::value) {
    simd::store_lanes(p, v);
  } else {
    float t[LaneTraits<V>::kWidth];
    simd::store_lanes(t, v);
    for (int j = 0; j < LaneTraits<V>::kWidth; ++j) p[j] = static_cast<T>(t[j]);
  }
}

// out[i] = f(lanes of a[i], b[i], c[i]) for i in [begin, end): whole vectors, then the tail through
// zero-padded buffers (only its real elements are written back). c may be null (then 0 lanes).
template <typename V, typename F, typename TA, typename TC, typename TO>
FASTRL_CPU_INLINE void map_lanes(F f, const TA* a, const TA* b, const TC* c, int64_t begin,
                                 int64_t end, TO* out) {
  constexpr int64_t W = LaneTraits<V>::kWidth;
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    const V cv = c != nullptr ? load_f32<V>(c + i) : splat<V>(0.0f);
    store_f32(out + i, f(load_f32<V>(a + i), load_f32<V>(b + i), cv));
  }
  if (i < end) {
    float ta[W] = {}, tb[W] = {}, tc[W] = {}, to[W];
    for (int64_t j = 0; j < end - i; ++j) {
      ta[j] = static_cast<float>(a[i + j]);
      tb[j] = static_cast<float>(b[i + j]);
      if (c != nullptr) tc[j] = static_cast<float>(c[i + j]);
    }
    simd::store_lanes(to, f(simd::load_lanes<V>(ta), simd::load_lanes<V>(tb),
                            simd::load_lanes<V>(tc)));
    for (int64_t j = 0; j < end - i; ++j) out[i + j] = static_cast<TO>(to[j]);
  }
}

// The element function of map_lanes: the k3 value, or the incoming gradient times d value / d logp.
// (A struct, not a lambda: its operator must be inlined into the ISA wrappers.)
template <credit::KlConvention C, bool kGrad>
struct K3Lanes {
  template <typename V>
  FASTRL_CPU_INLINE V operator()(V logp, V ref, V grad) const {
    if constexpr (kGrad) {
      return grad * k3_grad<C>(logp, ref);
    } else {
      return k3_value<C>(logp, ref);
    }
  }
};

template <typename V, typename Conv, typename scalar_t, typename out_t>
FASTRL_CPU_INLINE void k3_forward_span(Conv, const scalar_t* logp, const scalar_t* ref,
                                       int64_t begin, int64_t end, out_t* out) {
  map_lanes<V>(K3Lanes<Conv::value, false>{}, logp, ref, static_cast<const float*>(nullptr), begin,
               end, out);
}

template <typename V, typename Conv, typename scalar_t, typename out_t>
FASTRL_CPU_INLINE void k3_backward_span(Conv, const out_t* grad, const scalar_t* logp,
                                        const scalar_t* ref, int64_t begin, int64_t end,
                                        scalar_t* grad_logp) {
  map_lanes<V>(K3Lanes<Conv::value, true>{}, logp, ref, grad, begin, end, grad_logp);
}

FASTRL_CPU_ISA_VARIANTS(k3_forward_span)
FASTRL_CPU_ISA_VARIANTS(k3_backward_span)

}  // namespace

template <typename scalar_t, typename mask_t, typename acc_t>
int64_t gae(const scalar_t* rewards, const scalar_t* values, const mask_t* mask, const bool* dones,
            Rows rows, double gamma, double lam, credit::GaeMode mode, double turn_gamma,
            double turn_lam, acc_t* adv, acc_t* ret, credit::Moments* row_moments) {
  const credit::GaeCoefs<acc_t> k{static_cast<acc_t>(gamma), static_cast<acc_t>(gamma * lam),
                                  static_cast<acc_t>(turn_gamma),
                                  static_cast<acc_t>(turn_gamma * turn_lam)};
  const bool dense = mode == credit::GaeMode::kDense;
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, row_grain(rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = row_begin(rows, b);
      acc_t carry = 0, nv = 0;
      bool pending = false;  // a done flag seen on non-step positions since the last step
      for (int64_t i = row_end(rows, b) - 1; i >= begin; --i) {
        int bit = mask_bit(mask[i]);
        if (bit < 0) {  // reported (the op raises); keep scanning for the smallest bad index
          record_min(bad, i);
          bit = 0;
        }
        const bool done = dones != nullptr && dones[i];
        const acc_t v_raw = static_cast<acc_t>(values[i]);
        acc_t v = v_raw;
        if (bit == 1 || dense) {  // a step position (dense: r and v zeroed where masked)
          const acc_t r = bit == 1 ? static_cast<acc_t>(rewards[i]) : acc_t(0);
          v = bit == 1 ? v_raw : acc_t(0);
          carry = credit::apply(credit::gae_turn_step(r, v, nv, done || pending, k), carry);
          nv = v;
          pending = false;
        } else {
          if (mode == credit::GaeMode::kReset) {  // skip: carry and nv pass through
            // the CUDA scan's reset step (0, 0): 0 + 0 * carry, so a NaN/Inf after the reset still
            // reaches the positions before it on both devices (finite carries give +0 either way)
            carry = credit::apply(credit::gae_gap_step<acc_t>(mode), carry);
            nv = 0;
          }
          pending = pending || done;
        }
        adv[i] = carry;
        ret[i] = carry + v;
      }
      if (row_moments != nullptr) row_moments[b] = row_moments_of(adv, mask, begin, row_end(rows, b));
    }
  });
  return bad.load();
}

template <typename scalar_t, typename mask_t, typename acc_t>
int64_t discounted_returns(const scalar_t* rewards, const mask_t* mask, const bool* dones,
                           Rows rows, double gamma, credit::ReturnsMode mode, double turn_gamma,
                           acc_t* out, credit::Moments* row_moments) {
  const acc_t g = static_cast<acc_t>(gamma), tg = static_cast<acc_t>(turn_gamma);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, row_grain(rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = row_begin(rows, b);
      acc_t carry = 0;
      bool pending = false;  // a done flag seen on non-step positions since the last step
      for (int64_t i = row_end(rows, b) - 1; i >= begin; --i) {
        int bit = mask_bit(mask[i]);
        if (bit < 0) {  // reported (the op raises); keep scanning for the smallest bad index
          record_min(bad, i);
          bit = 0;
        }
        const bool done = dones != nullptr && dones[i];
        carry = credit::apply(credit::returns_turn_step(static_cast<acc_t>(rewards[i]), bit == 1,
                                                        done || pending, g, tg, mode),
                              carry);
        out[i] = credit::returns_output(carry, bit == 1, mode);
        pending = !credit::returns_is_step(bit == 1, mode) && (pending || done);
      }
      if (row_moments != nullptr) row_moments[b] = row_moments_of(out, mask, begin, row_end(rows, b));
    }
  });
  return bad.load();
}

template <typename scalar_t, typename mask_t>
int64_t masked_moments(const scalar_t* x, const mask_t* mask, int64_t n, credit::Moments* out) {
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<credit::Moments> chunk(static_cast<size_t>(num_chunks), credit::moments_empty());
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      double count = 0.0, sum = 0.0;
      for (int64_t i = begin; i < end; ++i) {
        const int bit = mask_bit(mask[i]);
        if (bit < 0) {
          record_min(bad, i);
          return;
        }
        if (bit) {  // a NaN outside the mask does not reach the sums (verl's masked_sum)
          count += 1.0;
          sum += static_cast<double>(x[i]);
        }
      }
      if (count == 0.0) continue;
      const double mean = sum / count;
      double m2 = 0.0;
      for (int64_t i = begin; i < end; ++i) {
        if (mask_bit(mask[i])) {
          const double d = static_cast<double>(x[i]) - mean;
          m2 += d * d;
        }
      }
      chunk[c] = credit::Moments{count, mean, m2};
    }
  });
  if (bad.load() >= 0) return bad.load();
  credit::Moments m = credit::moments_empty();
  for (int64_t c = 0; c < num_chunks; ++c) m = credit::moments_merge(m, chunk[c]);
  *out = m;
  return -1;
}

template <typename scalar_t>
void affine_transform(const scalar_t* x, int64_t n, const credit::WhitenCoefs& k, scalar_t* out) {
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<scalar_t>(credit::whiten_value(static_cast<double>(x[i]), k));
    }
  });
}

template <typename scalar_t, typename mask_t>
void masked_affine_transform(const scalar_t* x, const mask_t* mask, int64_t n,
                             const credit::WhitenCoefs& k, scalar_t* out) {
  at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t w = static_cast<scalar_t>(credit::whiten_value(static_cast<double>(x[i]), k));
      out[i] = w * static_cast<scalar_t>(mask[i]);
    }
  });
}

template <typename scalar_t, typename acc_t, typename out_t>
void kl_penalty(const scalar_t* logp, const scalar_t* ref, int64_t n, credit::KlKind kind,
                credit::KlConvention conv, out_t* out) {
  credit::dispatch_kl(kind, conv, [&](auto k, auto c) {
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      if constexpr (decltype(k)::value == credit::KlKind::kK3 && std::is_same<acc_t, float>::value) {
        FASTRL_CPU_ISA_CALL(k3_forward_span, c, logp, ref, begin, end, out);
      } else {
        for (int64_t i = begin; i < end; ++i) {
          out[i] = static_cast<out_t>(credit::kl_value<decltype(k)::value, decltype(c)::value>(
              static_cast<acc_t>(logp[i]), static_cast<acc_t>(ref[i])));
        }
      }
    });
  });
}

template <typename scalar_t, typename acc_t, typename out_t>
void kl_penalty_grad(const out_t* grad, const scalar_t* logp, const scalar_t* ref, int64_t n,
                     credit::KlKind kind, credit::KlConvention conv, scalar_t* grad_logp) {
  credit::dispatch_kl(kind, conv, [&](auto k, auto c) {
    at::parallel_for(0, n, kChunk, [&](int64_t begin, int64_t end) {
      if constexpr (decltype(k)::value == credit::KlKind::kK3 && std::is_same<acc_t, float>::value) {
        FASTRL_CPU_ISA_CALL(k3_backward_span, c, grad, logp, ref, begin, end, grad_logp);
      } else {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t g = credit::kl_grad<decltype(k)::value, decltype(c)::value>(
              static_cast<acc_t>(logp[i]), static_cast<acc_t>(ref[i]));
          grad_logp[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * g);
        }
      }
    });
  });
}

template <typename scalar_t, typename mask_t, typename acc_t>
int64_t token_rewards(const scalar_t* scores, const mask_t* mask, const scalar_t* kl, Rows rows,
                      double kl_coef, acc_t* out) {
  const acc_t c = static_cast<acc_t>(kl_coef);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, row_grain(rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = row_begin(rows, b);
      const acc_t score = static_cast<acc_t>(scores[b]);
      bool seen = false;  // a valid token after position i
      for (int64_t i = row_end(rows, b) - 1; i >= begin; --i) {
        int bit = mask_bit(mask[i]);
        if (bit < 0) {  // reported (the op raises); keep scanning for the smallest bad index
          record_min(bad, i);
          bit = 0;
        }
        const acc_t k = kl ? static_cast<acc_t>(kl[i]) : acc_t(0);
        out[i] = credit::token_reward(bit == 1, bit == 1 && !seen, score, c, k);
        seen = seen || bit == 1;
      }
    }
  });
  return bad.load();
}


// One pass over row b: (sum, count, last value, last index) of its valid tokens, fp64, in order.
template <typename scalar_t, typename mask_t>
inline int64_t segment_scan(const scalar_t* x, const mask_t* mask, int64_t begin, int64_t end,
                            double* sum, double* count, double* last, int64_t* last_i) {
  double s = 0.0, n = 0.0, l = 0.0;
  int64_t li = -1, bad = -1;
  for (int64_t i = begin; i < end; ++i) {
    int bit = mask ? mask_bit(mask[i]) : 1;
    if (bit < 0) {
      if (bad < 0) bad = i;
      continue;
    }
    if (bit == 1) {
      l = static_cast<double>(x[i]);
      s += l;
      n += 1.0;
      li = i;
    }
  }
  *sum = s;
  *count = n;
  *last = l;
  *last_i = li;
  return bad;
}

template <typename scalar_t, typename mask_t, typename out_t>
int64_t segment_reduce(const scalar_t* x, const mask_t* mask, Rows rows, credit::SegmentReduce op,
                       out_t* out) {
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, row_grain(rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s, n, l;
      int64_t li;
      const int64_t rb = segment_scan(x, mask, row_begin(rows, b), row_end(rows, b), &s, &n, &l, &li);
      if (rb >= 0) record_min(bad, rb);
      out[b] = static_cast<out_t>(credit::segment_value(op, s, n, l));
    }
  });
  return bad.load();
}

template <typename scalar_t, typename mask_t, typename out_t>
int64_t segment_reduce_grad(const out_t* grad, const scalar_t* x, const mask_t* mask, Rows rows,
                            credit::SegmentReduce op, scalar_t* grad_x) {
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, row_grain(rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = row_begin(rows, b), end = row_end(rows, b);
      double s, n, l;
      int64_t li;
      const int64_t rb = segment_scan(x, mask, begin, end, &s, &n, &l, &li);
      if (rb >= 0) record_min(bad, rb);
      const double g = static_cast<double>(grad[b]);
      const double f = n > 0.0 ? credit::segment_grad(op, s, n, false) : 0.0;
      for (int64_t i = begin; i < end; ++i) {
        const bool valid = mask ? mask_bit(mask[i]) == 1 : true;
        const double fi = (op == credit::SegmentReduce::kLast) ? (i == li ? 1.0 : 0.0) : f;
        grad_x[i] = static_cast<scalar_t>(valid ? g * fi : 0.0);
      }
    }
  });
  return bad.load();
}

template <typename scalar_t, typename mask_t, typename acc_t>
int64_t implicit_rewards(const scalar_t* logp, const scalar_t* ref, const mask_t* mask,
                         const bool* step_ends, Rows rows, double beta, acc_t* out) {
  const acc_t bt = static_cast<acc_t>(beta);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, row_grain(rows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0.0;
      int64_t last = -1;  // the open step's last valid token (-1: no open step)
      for (int64_t i = row_begin(rows, b), end = row_end(rows, b); i < end; ++i) {
        int bit = mask ? mask_bit(mask[i]) : 1;
        if (bit < 0) {  // reported (the op raises); keep scanning for the smallest bad index
          record_min(bad, i);
          bit = 0;
        }
        const acc_t r = bit == 1 ? credit::implicit_reward(static_cast<acc_t>(logp[i]),
                                                           static_cast<acc_t>(ref[i]), bt)
                                 : acc_t(0);
        if (step_ends == nullptr) {
          out[i] = r;
          continue;
        }
        out[i] = 0;
        if (bit == 1) {
          sum += static_cast<double>(r);
          last = i;
        }
        if (step_ends[i] && last >= 0) {
          out[last] = static_cast<acc_t>(sum);
          sum = 0.0;
          last = -1;
        }
      }
      if (step_ends != nullptr && last >= 0) out[last] = static_cast<acc_t>(sum);
    }
  });
  return bad.load();
}

#define FASTRL_INSTANTIATE_KL(T, A, O)                                                           \
  template void kl_penalty<T, A, O>(const T*, const T*, int64_t, credit::KlKind,                 \
                                    credit::KlConvention, O*);                                   \
  template void kl_penalty_grad<T, A, O>(const O*, const T*, const T*, int64_t, credit::KlKind,  \
                                         credit::KlConvention, T*);
FASTRL_INSTANTIATE_KL(float, float, float)
FASTRL_INSTANTIATE_KL(double, double, double)
FASTRL_INSTANTIATE_KL(c10::Half, float, c10::Half)
FASTRL_INSTANTIATE_KL(c10::BFloat16, float, c10::BFloat16)
FASTRL_INSTANTIATE_KL(double, float, float)  // OpenRLHF: fp32 arithmetic and output
FASTRL_INSTANTIATE_KL(c10::Half, float, float)
FASTRL_INSTANTIATE_KL(c10::BFloat16, float, float)
#undef FASTRL_INSTANTIATE_KL

#define FASTRL_INSTANTIATE_MASKED(T, M, A)                                                          \
  template int64_t gae<T, M, A>(const T*, const T*, const M*, const bool*, Rows, double, double,   \
                                credit::GaeMode, double, double, A*, A*, credit::Moments*);      \
  template int64_t discounted_returns<T, M, A>(const T*, const M*, const bool*, Rows, double,      \
                                               credit::ReturnsMode, double, A*, credit::Moments*);  \
  template int64_t masked_moments<T, M>(const T*, const M*, int64_t, credit::Moments*);       \
  template int64_t token_rewards<T, M, A>(const T*, const M*, const T*, Rows, double, A*);      \
  template int64_t segment_reduce<T, M, A>(const T*, const M*, Rows, credit::SegmentReduce, A*); \
  template int64_t segment_reduce_grad<T, M, A>(const A*, const T*, const M*, Rows,              \
                                                credit::SegmentReduce, T*);                      \
  template int64_t implicit_rewards<T, M, A>(const T*, const T*, const M*, const bool*, Rows,     \
                                             double, A*);
#define FASTRL_INSTANTIATE(T, A)                  \
  FASTRL_INSTANTIATE_MASKED(T, bool, A)           \
  FASTRL_INSTANTIATE_MASKED(T, uint8_t, A)        \
  FASTRL_INSTANTIATE_MASKED(T, int32_t, A)        \
  FASTRL_INSTANTIATE_MASKED(T, int64_t, A)        \
  FASTRL_INSTANTIATE_MASKED(T, float, A)          \
  FASTRL_INSTANTIATE_MASKED(T, double, A)         \
  template void affine_transform<T>(const T*, int64_t, const credit::WhitenCoefs&, T*);
FASTRL_INSTANTIATE(float, float)
FASTRL_INSTANTIATE(double, double)
FASTRL_INSTANTIATE(c10::Half, float)
FASTRL_INSTANTIATE(c10::BFloat16, float)
#undef FASTRL_INSTANTIATE
#undef FASTRL_INSTANTIATE_MASKED

// The fused whitening of discounted_returns: its fp32 / fp64 outputs, any mask type.
#define FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, M)                                               \
  template void masked_affine_transform<A, M>(const A*, const M*, int64_t,                   \
                                              const credit::WhitenCoefs&, A*);
#define FASTRL_INSTANTIATE_MASKED_AFFINE(A)          \
  FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, bool)        \
  FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, uint8_t)     \
  FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, int32_t)     \
  FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, int64_t)     \
  FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, float)       \
  FASTRL_INSTANTIATE_MASKED_AFFINE_M(A, double)
FASTRL_INSTANTIATE_MASKED_AFFINE(float)
FASTRL_INSTANTIATE_MASKED_AFFINE(double)
#undef FASTRL_INSTANTIATE_MASKED_AFFINE
#undef FASTRL_INSTANTIATE_MASKED_AFFINE_M

}  // namespace cpu
}  // namespace fastrl
