// CPU kernels of the fused policy-loss family (see cpu/losses.h, fastrl/losses.h).
//
// Rows in parallel (at::parallel_for); each row is walked by one thread: a first pass for the
// row-level quantities some kinds need (sequence ratio, GMPO means), then its tokens, which give
// the row's statistics (fp64 sums) and each token's derivatives. The backward scales those by the
// row's incoming gradients: one streaming pass.
//
// The common case -- fp32 / bf16 / fp16 inputs, a token-level ratio, kinds vanilla (PPO clip, dual
// clip, TRL's delta), gpg and cispo, any KL estimator, entropy, importance weights -- runs its
// whole token pass in SIMD lanes (the lane pass below): fastrl/losses.h's per-token math
// (token_terms, kl_term, stats_token) written over a lane type with the same fp32 / fp64
// operations in the same order, so each token's terms and derivatives have the header's bits (the
// CUDA kernel's). Its statistics are summed per logical lane: token k of a row feeds lane
// k % kLanes (fp64 partial sums in token order; counts as exact integers) and the row adds its
// lanes in order at its end. The lanes are logical, not the ISA's: every ISA and thread count gives
// the same bits.
//
// The other cases (gspo, sapo, geo_mean, sequence level) go in blocks of kBlock tokens: the block's
// exps (the ratio's and the KL estimator's) in SIMD lanes first (cpu/simd.h: the same bits on every
// ISA), then the scalar header math on each token, summing in token order. fp64 inputs take libm's
// exp inline instead.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // selects -> vector blends (see cpu/simd.h)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/losses.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

namespace fastrl {
namespace cpu {
namespace {

// 1 / 0 for a 0/1 mask value, -1 for anything else (NaN included).
template <typename mask_t>
inline int valid_bit(mask_t m) {
  const double x = static_cast<double>(m);
  return x == 1.0 ? 1 : (x == 0.0 ? 0 : -1);
}
template <>
inline int valid_bit<bool>(bool m) {
  return m ? 1 : 0;
}

inline void keep_min(std::atomic<int64_t>& bad, int64_t i) {
  int64_t cur = bad.load();
  while ((cur < 0 || i < cur) && !bad.compare_exchange_weak(cur, i)) {
  }
}

constexpr int64_t kBlock = 256;  // tokens per block of exps (a multiple of every lane width)

// buf[i] = exp(buf[i]) for i < n rounded up to the lane width (buf holds kBlock floats).
template <typename V>
FASTRL_CPU_INLINE void exp_block(float* buf, int64_t n) {
  constexpr int64_t kW = simd::LaneTraits<V>::kWidth;
  for (int64_t i = 0; i < n; i += kW) simd::store_lanes(buf + i, simd::fast_exp(simd::load_lanes<V>(buf + i)));
}

// ------------------------------------------------------------------------- the lane token pass
using simd::LaneTraits;
using simd::select;
using simd::splat;

constexpr int kLanes = 8;  // logical lanes: the AVX2 kernel's (kBlock is a multiple)

FASTRL_CPU_INLINE bool lane_pass(const losses::Params& p) {
  return p.level == losses::RatioLevel::kToken &&
         (p.kind == losses::Kind::kVanilla || p.kind == losses::Kind::kGpg || p.kind == losses::Kind::kCispo);
}

// The fp64 sums of a row that the lanes accumulate (its kAux column is kl_coef * kKlSum -
// entropy_coef * kEntropySum: the same terms as stats_token's, summed in another order).
enum LaneSum : int { kSumPolicy, kSumNegLog, kSumRatio, kSumEntropy, kSumKl, kNumSums };
constexpr int kLaneSumCol[kNumSums] = {losses::kPolicy, losses::kNegLogRatio, losses::kRatioSum,
                                       losses::kEntropySum, losses::kKlSum};
// Its counts, packed in one int32 lane per block: kCountBits bits each (a lane sees kBlock / kLanes
// = 32 tokens a block).
constexpr int kNumCounts = 5, kCountBits = 6;
static_assert(kBlock / kLanes < (1 << kCountBits), "a block's count must fit its bits");
constexpr int kLaneCountCol[kNumCounts] = {losses::kCount, losses::kClip, losses::kClipLower, losses::kLowRegion,
                                           losses::kHighRegion};

// A row's partial statistics between its blocks: fp64 sums and ratio min / max per logical lane,
// the counts (integers: exact in any order).
struct LaneAcc {
  double sum[kNumSums][kLanes];
  float ratio_min[kLanes], ratio_max[kLanes];
  double count[kNumCounts];
};

// One block of a row's tokens as fp32: n (a multiple of kLanes: a row's tail is padded with masked
// tokens) tokens from the inputs or from staged copies. adv null: adv_row for every token; ref /
// entropy / is_w null: absent. valid: -1 (mask 1) or 0. The derivatives go to dpol / daux (daux
// null without ref), 0 at masked tokens.
struct LaneBlock {
  const float *logp, *old_logp, *adv, *ref, *entropy, *is_w;
  const int32_t* valid;
  float adv_row;
  int64_t n;
  float *dpol, *daux;
};

// A sum's W lanes, loaded from / stored to LaneAcc (lanes [0, W/2) in lo, as simd::to_double).
template <typename V>
FASTRL_CPU_INLINE simd::Doubles<V> load_sum(const double* p) {
  simd::Doubles<V> d;
  std::memcpy(&d, p, sizeof(d));
  return d;
}
template <typename V>
FASTRL_CPU_INLINE void store_sum(double* p, const simd::Doubles<V>& d) {
  std::memcpy(p, &d, sizeof(d));
}

// sum + fp64(x) in the valid lanes (+0 in the others: the sum is unchanged).
template <typename V, typename I>
FASTRL_CPU_INLINE simd::Doubles<V> add_valid(const simd::Doubles<V>& sum, I valid, V x) {
  return sum + simd::to_double(select(valid, x, splat<V>(0.0f)));
}

// Tokens [k, k + W) of the block: logp - old_logp, clamped to [-lc, lc] (kClamp) as
// losses::clamp_log_ratio.
template <typename V, bool kClamp>
FASTRL_CPU_INLINE V clamped_log_ratio(const LaneBlock& blk, int64_t k, float lc) {
  const V x = simd::load_lanes<V>(blk.logp + k) - simd::load_lanes<V>(blk.old_logp + k);
  return kClamp ? simd::clamp_nan(x, -lc, lc) : x;
}

// The policy half of losses::stats_token (with token_terms) over a block, on vectors V of tokens:
// the same fp32 / fp64 operations per token. kind K; kDual: the dual clip (vanilla); kClamp: a
// log-ratio clamp; kIsW: importance weights. (TRL's delta is a runtime bound, +inf without one: r >
// +inf never holds, so r' = r exactly.) Three short loops (the ratios;
// the terms, dpol and the counts; the sums and the ratio's min / max) rather than one long one:
// short loop bodies overlap across iterations, a long one waits on its exp's latency. The selects
// keep masked tokens' values (garbage, NaN included) out of every sum and output.
template <typename V, losses::Kind K, bool kDual, bool kClamp, bool kIsW>
FASTRL_CPU_INLINE void lane_policy(const losses::Params& p, const LaneBlock& blk, LaneAcc* acc) {
  using I = typename LaneTraits<V>::Int;
  using D = simd::Doubles<V>;
  using losses::Kind;
  constexpr int W = LaneTraits<V>::kWidth, H = kLanes / W;
  // the header's fp32 parameters (A(p.clip_lo), ...)
  const float lo = static_cast<float>(p.clip_lo), hi = static_cast<float>(p.clip_hi);
  const float lc = static_cast<float>(p.log_clamp), c3 = static_cast<float>(p.dual_clip);
  const float delta = p.delta > 0.0 ? static_cast<float>(p.delta) : INFINITY;
  const V zero = splat<V>(0.0f);
  alignas(64) float ratio_buf[kBlock], pg_buf[kBlock];
  for (int64_t k = 0; k < blk.n; k += W) {
    simd::store_lanes(ratio_buf + k, simd::fast_exp(clamped_log_ratio<V, kClamp>(blk, k, lc)));
  }
  I cnt[H] = {};
  for (int64_t c = 0; c < blk.n; c += kLanes) {
    for (int h = 0; h < H; ++h) {
      const int64_t k = c + h * W;
      I valid;
      std::memcpy(&valid, blk.valid + k, sizeof(I));
      const V lp = simd::load_lanes<V>(blk.logp + k), r = simd::load_lanes<V>(ratio_buf + k);
      const V adv = blk.adv ? simd::load_lanes<V>(blk.adv + k) : splat<V>(blk.adv_row);
      I passes = ~I{};  // d r / d logp passes the clamp
      if constexpr (kClamp) passes = simd::in_range(lp - simd::load_lanes<V>(blk.old_logp + k), -lc, lc);
      // token_terms
      V pg, d_r = zero, d_lp = zero;
      I clip = I{}, clip_lower = I{};
      if constexpr (K == Kind::kVanilla) {
        const V neg_adv = -adv;
        const I over = r > delta;
        const V r1 = select(over, splat<V>(delta), r), d1 = select(over, zero, neg_adv);
        const V cl = simd::clamp_nan(r, lo, hi);
        const V l1 = neg_adv * r1, l2 = neg_adv * cl;
        const V d2 = select(simd::in_range(r, lo, hi), neg_adv, zero);
        pg = select(l1 > l2, l1, l2);
        pg = select(l1 != l1, l1, select(l2 != l2, l2, pg));  // torch.maximum propagates a NaN
        d_r = select(l1 > l2, d1, select(l1 < l2, d2, 0.5f * (d1 + d2)));
        clip = l2 > l1;
        if constexpr (kDual) {
          const I neg = adv < 0.0f;
          const V l3 = neg_adv * c3;
          clip_lower = neg & (pg > l3);
          const V dd = select(pg < l3, d_r, select(pg > l3, zero, 0.5f * d_r));
          pg = select(clip_lower, l3, pg);
          d_r = select(neg, dd, d_r);
        }
      } else if constexpr (K == Kind::kGpg) {
        pg = -lp * adv;
        d_lp = -adv;
      } else {  // cispo
        const V cl = simd::clamp_nan(r, lo, hi);
        d_lp = -cl * adv;
        pg = d_lp * lp;
        clip = r != cl;
      }
      simd::store_lanes(pg_buf + k, pg);
      // dpol = (d_lp + (passes ? d_r r : 0)) * is_w, stats_token's fp64 formula
      V dpol;
      if constexpr (kIsW) {
        const D prod = simd::to_double(select(passes, d_r, zero)) * simd::to_double(select(passes, r, zero));
        dpol = simd::to_float<V>((simd::to_double(d_lp) + prod) * simd::to_double(simd::load_lanes<V>(blk.is_w + k)));
      } else if constexpr (K == Kind::kVanilla) {
        // fp32(0 + d_r r in fp64) in fp32: the product rounded once; the fp64 0 + turns a zero
        // product's -0 into +0, not an underflowed product's
        const V prod = d_r * r;
        dpol = select(passes, select((d_r != 0.0f) & (r != 0.0f), prod, prod + 0.0f), zero);
      } else {  // d_r = 0: d_lp + 0 r, exact in fp32
        dpol = d_lp + select(passes, 0.0f * r, zero);
      }
      simd::store_lanes(blk.dpol + k, select(valid, dpol, zero));
      const I low = (r < lo) & (adv < 0.0f), high = (r > hi) & (adv > 0.0f);
      cnt[h] += valid & ((1 | (clip & (1 << kCountBits))) | ((clip_lower & (1 << 2 * kCountBits)) |
                          (low & (1 << 3 * kCountBits))) | (high & (1 << 4 * kCountBits)));
    }
  }
  D pol[H], neg_log[H], ratio[H];
  V rmin[H], rmax[H];
  for (int h = 0; h < H; ++h) {
    pol[h] = load_sum<V>(acc->sum[kSumPolicy] + h * W);
    neg_log[h] = load_sum<V>(acc->sum[kSumNegLog] + h * W);
    ratio[h] = load_sum<V>(acc->sum[kSumRatio] + h * W);
    rmin[h] = simd::load_lanes<V>(acc->ratio_min + h * W);
    rmax[h] = simd::load_lanes<V>(acc->ratio_max + h * W);
  }
  for (int64_t c = 0; c < blk.n; c += kLanes) {
    for (int h = 0; h < H; ++h) {
      const int64_t k = c + h * W;
      I valid;
      std::memcpy(&valid, blk.valid + k, sizeof(I));
      const V r = simd::load_lanes<V>(ratio_buf + k), pg = simd::load_lanes<V>(pg_buf + k);
      if constexpr (kIsW) {
        const D w = simd::to_double(select(valid, simd::load_lanes<V>(blk.is_w + k), zero));
        pol[h] = pol[h] + simd::to_double(select(valid, pg, zero)) * w;
      } else {
        pol[h] = add_valid(pol[h], valid, pg);
      }
      neg_log[h] = add_valid(neg_log[h], valid, -clamped_log_ratio<V, kClamp>(blk, k, lc));
      ratio[h] = add_valid(ratio[h], valid, r);
      rmin[h] = simd::nan_min(rmin[h], select(valid, r, splat<V>(INFINITY)));
      rmax[h] = simd::nan_max(rmax[h], select(valid, r, splat<V>(-INFINITY)));
    }
  }
  for (int h = 0; h < H; ++h) {
    store_sum(acc->sum[kSumPolicy] + h * W, pol[h]);
    store_sum(acc->sum[kSumNegLog] + h * W, neg_log[h]);
    store_sum(acc->sum[kSumRatio] + h * W, ratio[h]);
    simd::store_lanes(acc->ratio_min + h * W, rmin[h]);
    simd::store_lanes(acc->ratio_max + h * W, rmax[h]);
    int32_t packed[W];
    std::memcpy(packed, &cnt[h], sizeof(packed));
    for (int j = 0; j < W; ++j) {
      for (int q = 0; q < kNumCounts; ++q) acc->count[q] += (packed[j] >> (q * kCountBits)) & ((1 << kCountBits) - 1);
    }
  }
}

// The KL / entropy half of losses::stats_token (with kl_term) over a block: estimator KL (kNone:
// entropy only), kEntropy: an entropy input. Sums kKlSum, kEntropySum; writes daux. The k3 exps
// first, in their own loop (as lane_policy's ratios).
template <typename V, losses::KlMode KL, bool kEntropy>
FASTRL_CPU_INLINE void lane_aux(const losses::Params& p, const LaneBlock& blk, LaneAcc* acc) {
  using I = typename LaneTraits<V>::Int;
  using D = simd::Doubles<V>;
  using losses::KlMode;
  constexpr int W = LaneTraits<V>::kWidth, H = kLanes / W;
  D kl_sum[H], ent_sum[H];
  for (int h = 0; h < H; ++h) {
    kl_sum[h] = load_sum<V>(acc->sum[kSumKl] + h * W);
    ent_sum[h] = load_sum<V>(acc->sum[kSumEntropy] + h * W);
  }
  const V zero = splat<V>(0.0f);
  alignas(64) float ebuf[kBlock];  // kl_exp_arg's exps
  if constexpr (KL == KlMode::kK3 || KL == KlMode::kK3Trl) {
    for (int64_t k = 0; k < blk.n; k += W) {
      const V d = simd::load_lanes<V>(blk.ref + k) - simd::load_lanes<V>(blk.logp + k);
      if constexpr (KL == KlMode::kK3) {
        // the argument is at most 20: the bounded exp gives the same bits
        simd::store_lanes(ebuf + k, simd::fast_exp<V, true>(simd::clamp_nan(d, -20.0f, 20.0f)));
      } else {
        simd::store_lanes(ebuf + k, simd::fast_exp(d));
      }
    }
  }
  for (int64_t c = 0; c < blk.n; c += kLanes) {
    for (int h = 0; h < H; ++h) {
      const int64_t k = c + h * W;
      I valid;
      std::memcpy(&valid, blk.valid + k, sizeof(I));
      if constexpr (KL != KlMode::kNone) {
        const V lp = simd::load_lanes<V>(blk.logp + k), ref = simd::load_lanes<V>(blk.ref + k);
        V kl, grad;
        if constexpr (KL == KlMode::kK3) {
          const V raw = ref - lp;
          const V a = simd::clamp_nan(raw, -20.0f, 20.0f);
          const V e = simd::load_lanes<V>(ebuf + k);
          const V v = (e - a) - 1.0f;
          kl = simd::clamp_nan(v, -10.0f, 10.0f);
          grad = select(simd::in_range(raw, -20.0f, 20.0f) & simd::in_range(v, -10.0f, 10.0f), 1.0f - e, zero);
        } else if constexpr (KL == KlMode::kK3Trl) {
          const V d = ref - lp;
          const V e = simd::load_lanes<V>(ebuf + k);
          grad = 1.0f - e;
          kl = (e - d) - 1.0f;
        } else {
          const V d = lp - ref;
          if constexpr (KL == KlMode::kK1) {
            kl = d;
            grad = splat<V>(1.0f);
          } else if constexpr (KL == KlMode::kAbs) {
            kl = simd::abs_lanes(d);
            grad = select(d > 0.0f, splat<V>(1.0f), select(d < 0.0f, splat<V>(-1.0f), d * 0.0f));
          } else {  // k2
            kl = 0.5f * (d * d);
            grad = d;
          }
        }
        kl_sum[h] = add_valid(kl_sum[h], valid, kl);
        simd::store_lanes(blk.daux + k, select(valid, simd::to_float<V>(simd::to_double(grad) * p.kl_coef), zero));
      }
      if constexpr (kEntropy) ent_sum[h] = add_valid(ent_sum[h], valid, simd::load_lanes<V>(blk.entropy + k));
    }
  }
  for (int h = 0; h < H; ++h) {
    store_sum(acc->sum[kSumKl] + h * W, kl_sum[h]);
    store_sum(acc->sum[kSumEntropy] + h * W, ent_sum[h]);
  }
}

// F::template run<b...>(args...) with the first N of the runtime bools b as template arguments.
// (Structs, not lambdas: everything must inline into the ISA copies.)
template <int N, typename F, bool... kB>
struct WithBools {
  template <typename... Args>
  static FASTRL_CPU_INLINE void call(const bool* b, const Args&... args) {
    if constexpr (sizeof...(kB) == N) {
      F::template run<kB...>(args...);
    } else if (b[sizeof...(kB)]) {
      WithBools<N, F, kB..., true>::call(b, args...);
    } else {
      WithBools<N, F, kB..., false>::call(b, args...);
    }
  }
};
template <typename V>
struct VanillaPass {
  template <bool kDual, bool kClamp, bool kIsW>
  static FASTRL_CPU_INLINE void run(const losses::Params& p, const LaneBlock& blk, LaneAcc* const& acc) {
    lane_policy<V, losses::Kind::kVanilla, kDual, kClamp, kIsW>(p, blk, acc);
  }
};
template <typename V, losses::Kind K>
struct LogpPass {  // gpg, cispo: no dual clip
  template <bool kClamp, bool kIsW>
  static FASTRL_CPU_INLINE void run(const losses::Params& p, const LaneBlock& blk, LaneAcc* const& acc) {
    lane_policy<V, K, false, kClamp, kIsW>(p, blk, acc);
  }
};
template <typename V, losses::KlMode KL>
struct AuxPass {
  template <bool kEntropy>
  static FASTRL_CPU_INLINE void run(const losses::Params& p, const LaneBlock& blk, LaneAcc* const& acc) {
    lane_aux<V, KL, kEntropy>(p, blk, acc);
  }
};

// A block: the policy pass of the call's kind and options, then the KL / entropy pass, each
// compiled per combination (no per-token tests of the options).
template <typename V>
FASTRL_CPU_INLINE void lane_block(const losses::Params* p, const LaneBlock* blk, LaneAcc* acc) {
  using losses::Kind;
  using losses::KlMode;
  const bool policy[3] = {p->dual_clip > 0.0, p->log_clamp > 0.0, blk->is_w != nullptr};
  switch (p->kind) {
    case Kind::kGpg: WithBools<2, LogpPass<V, Kind::kGpg>>::call(policy + 1, *p, *blk, acc); break;
    case Kind::kCispo: WithBools<2, LogpPass<V, Kind::kCispo>>::call(policy + 1, *p, *blk, acc); break;
    default: WithBools<3, VanillaPass<V>>::call(policy, *p, *blk, acc); break;
  }
  const bool entropy = blk->entropy != nullptr;
  switch (blk->ref ? p->kl : KlMode::kNone) {
    case KlMode::kK1: WithBools<1, AuxPass<V, KlMode::kK1>>::call(&entropy, *p, *blk, acc); break;
    case KlMode::kAbs: WithBools<1, AuxPass<V, KlMode::kAbs>>::call(&entropy, *p, *blk, acc); break;
    case KlMode::kK2: WithBools<1, AuxPass<V, KlMode::kK2>>::call(&entropy, *p, *blk, acc); break;
    case KlMode::kK3: WithBools<1, AuxPass<V, KlMode::kK3>>::call(&entropy, *p, *blk, acc); break;
    case KlMode::kK3Trl: WithBools<1, AuxPass<V, KlMode::kK3Trl>>::call(&entropy, *p, *blk, acc); break;
    default:
      if (entropy) lane_aux<V, KlMode::kNone, true>(*p, *blk, acc);
      break;
  }
}

// The kernel's copies: 8 AVX2 lanes, or 4 SSE2 lanes (the baseline). An AVX-512 row kernel calls
// the AVX2 copy: GCC 12 expands AVX-512 vector comparisons used as values (mask & mask, merged
// selects) element by element, slower than 8 AVX2 lanes.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((noinline)) FASTRL_TARGET_AVX2 void lane_block_avx2(const losses::Params* p, const LaneBlock* blk,
                                                                  LaneAcc* acc) {
  lane_block<simd::VecF<8>::type>(p, blk, acc);
}
#endif
__attribute__((noinline)) void lane_block_baseline(const losses::Params* p, const LaneBlock* blk, LaneAcc* acc) {
  lane_block<simd::VecF<4>::type>(p, blk, acc);
}

// The copy for the ISA of a row kernel of lane type V.
template <typename V>
FASTRL_CPU_INLINE void lane_block_for(const losses::Params* p, const LaneBlock* blk, LaneAcc* acc) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (LaneTraits<V>::kWidth > 1) {
    lane_block_avx2(p, blk, acc);
  } else {
    lane_block_baseline(p, blk, acc);
  }
#else
  lane_block_baseline(p, blk, acc);
#endif
}

// valid[k] = -1 where mask[k] is 1 (a bool: true), else 0, for k < n; returns the smallest k whose
// value is neither 0 nor 1, or -1.
template <typename mask_t>
FASTRL_CPU_INLINE int64_t stage_mask(const mask_t* mask, int64_t n, int32_t* valid) {
  if constexpr (std::is_same<mask_t, bool>::value) {
    const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);  // GCC does not vectorize loads of bool
    for (int64_t k = 0; k < n; ++k) valid[k] = m[k] != 0 ? -1 : 0;
    return -1;
  } else {
    int32_t any_bad = 0;
    for (int64_t k = 0; k < n; ++k) {
      const bool one = mask[k] == mask_t(1), zero = mask[k] == mask_t(0);
      valid[k] = one ? -1 : 0;
      any_bad |= !(one | zero);
    }
    if (any_bad) {
      for (int64_t k = 0; k < n; ++k) {
        if (valid_bit(mask[k]) < 0) return k;
      }
    }
    return -1;
  }
}

// src[0, n) as fp32 lanes: src itself (fp32, n == padded), else fp32 copies in buf, zeros up to
// padded.
template <typename scalar_t>
FASTRL_CPU_INLINE const float* lane_input(const scalar_t* src, int64_t n, int64_t padded, float* buf) {
  if (src == nullptr) return nullptr;
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (n == padded) return src;
  }
  for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(src[k]);
  for (int64_t k = n; k < padded; ++k) buf[k] = 0.0f;
  return buf;
}

template <typename scalar_t, typename mask_t, typename acc_t>
class RowKernel {
 public:
  RowKernel(const LossInputs<scalar_t, mask_t>& in, Rows rows, const losses::Params& p) : in_(in), rows_(rows), p_(p) {}

  // One row; returns its smallest bad mask index or -1. V: the lane type of the exps.
  template <typename V>
  FASTRL_CPU_INLINE int64_t forward(int64_t b, double* out, acc_t* dpol, acc_t* daux) const {
    constexpr bool kSimdExp = std::is_same<acc_t, float>::value;
    if constexpr (kSimdExp) {
      if (lane_pass(p_)) return lane_forward<V>(b, out, dpol, daux);
    }
    alignas(64) float e_ratio[kBlock] = {}, e_kl[kBlock] = {};
    // A local copy: the compiler can then keep the parameters in registers and hoist the
    // per-token tests on them (kind, clip bounds, ...) out of the loop.
    const losses::Params p = p_;
    losses::RowCtx<acc_t> ctx;
    int64_t bad = row_ctx(b, &ctx);
    losses::Stats s = losses::stats_zero();
    for (int64_t i0 = begin(b), e = end(b); i0 < e; i0 += kBlock) {
      const int64_t n = std::min(kBlock, e - i0);
      if constexpr (kSimdExp) block_exps<V>(i0, n, e_ratio, e_kl);
      for (int64_t i = i0; i < i0 + n; ++i) {
        const int bit = valid_bit(in_.mask[i]);
        double dp = 0.0, da = 0.0;
        if (bit == 1) {
          const Token tok = token(b, i);
          losses::TokenExps<acc_t> ex;
          if constexpr (kSimdExp) {
            ex = {e_ratio[i - i0], e_kl[i - i0]};
          } else {
            ex = losses::token_exps(p, tok.lp, tok.x, tok.ref_p());
          }
          losses::stats_token(p, ctx, tok.lp, tok.x, tok.adv, tok.ref_p(), tok.ent_p(), tok.is_w_p(), ex, &s, &dp,
                              &da);
        } else if (bit < 0 && bad < 0) {
          bad = i;
        }
        dpol[i] = static_cast<acc_t>(dp);
        if (daux) daux[i] = static_cast<acc_t>(da);
      }
    }
    losses::stats_finish(p, ctx, &s);
    for (int k = 0; k < losses::kNumStats; ++k) out[k] = s.v[k];
    return bad;
  }

 private:
  // The row on the lane pass (fp32 accumulation: acc_t is float).
  template <typename V>
  FASTRL_CPU_INLINE int64_t lane_forward(int64_t b, double* out, float* dpol, float* daux) const {
    alignas(64) float buf[6][kBlock], out_buf[2][kBlock];
    alignas(64) int32_t valid[kBlock];
    LaneAcc acc;
    for (int s = 0; s < kNumSums; ++s) std::fill_n(acc.sum[s], kLanes, 0.0);
    std::fill_n(acc.ratio_min, kLanes, INFINITY);
    std::fill_n(acc.ratio_max, kLanes, -INFINITY);
    std::fill_n(acc.count, kNumCounts, 0.0);
    int64_t bad = -1;
    for (int64_t i0 = begin(b), e = end(b); i0 < e; i0 += kBlock) {
      const int64_t n = std::min(kBlock, e - i0), padded = (n + kLanes - 1) / kLanes * kLanes;
      const int64_t bad_k = stage_mask(in_.mask + i0, n, valid);
      if (bad_k >= 0 && bad < 0) bad = i0 + bad_k;
      std::fill(valid + n, valid + padded, 0);
      const bool direct = n == padded;  // outputs straight to dpol / daux
      LaneBlock blk;
      blk.logp = lane_input(in_.logp + i0, n, padded, buf[0]);
      blk.old_logp = lane_input(in_.old_logp + i0, n, padded, buf[1]);
      blk.adv = in_.adv_per_row ? nullptr : lane_input(in_.adv + i0, n, padded, buf[2]);
      blk.adv_row = in_.adv_per_row ? static_cast<float>(in_.adv[b]) : 0.0f;
      blk.ref = in_.ref ? lane_input(in_.ref + i0, n, padded, buf[3]) : nullptr;
      blk.entropy = in_.entropy ? lane_input(in_.entropy + i0, n, padded, buf[4]) : nullptr;
      blk.is_w = in_.is_w ? lane_input(in_.is_w + i0, n, padded, buf[5]) : nullptr;
      blk.valid = valid;
      blk.n = padded;
      blk.dpol = direct ? dpol + i0 : out_buf[0];
      blk.daux = daux ? (direct ? daux + i0 : out_buf[1]) : nullptr;
      lane_block_for<V>(&p_, &blk, &acc);
      if (!direct) {
        std::copy_n(out_buf[0], n, dpol + i0);
        if (daux) std::copy_n(out_buf[1], n, daux + i0);
      }
    }
    // the row's statistics: its lanes added in order
    losses::Stats s = losses::stats_zero();
    for (int j = 0; j < kLanes; ++j) {
      for (int k = 0; k < kNumSums; ++k) s.v[kLaneSumCol[k]] += acc.sum[k][j];
      s.v[losses::kRatioMin] = nan_min(s.v[losses::kRatioMin], static_cast<double>(acc.ratio_min[j]));
      s.v[losses::kRatioMax] = nan_max(s.v[losses::kRatioMax], static_cast<double>(acc.ratio_max[j]));
    }
    for (int k = 0; k < kNumCounts; ++k) s.v[kLaneCountCol[k]] = acc.count[k];
    s.v[losses::kAux] = p_.kl_coef * s.v[losses::kKlSum] - p_.entropy_coef * s.v[losses::kEntropySum];
    losses::stats_finish(p_, losses::row_ctx<float>(p_, losses::row_sums_zero(), false), &s);
    for (int k = 0; k < losses::kNumStats; ++k) out[k] = s.v[k];
    return bad;
  }

  struct Token {
    acc_t lp, x, adv, ref, ent, is_w;
    bool has_ref, has_ent, has_is_w;
    const acc_t* ref_p() const { return has_ref ? &ref : nullptr; }
    const acc_t* ent_p() const { return has_ent ? &ent : nullptr; }
    const acc_t* is_w_p() const { return has_is_w ? &is_w : nullptr; }
  };

  FASTRL_CPU_INLINE Token token(int64_t b, int64_t i) const {
    Token t;
    t.lp = static_cast<acc_t>(in_.logp[i]);
    t.x = log_ratio(i);
    t.adv = static_cast<acc_t>(in_.adv_per_row ? in_.adv[b] : in_.adv[i]);
    t.has_ref = in_.ref != nullptr;
    t.has_ent = in_.entropy != nullptr;
    t.has_is_w = in_.is_w != nullptr;
    t.ref = t.has_ref ? static_cast<acc_t>(in_.ref[i]) : acc_t(0);
    t.ent = t.has_ent ? static_cast<acc_t>(in_.entropy[i]) : acc_t(0);
    t.is_w = t.has_is_w ? static_cast<acc_t>(in_.is_w[i]) : acc_t(0);
    return t;
  }

  // The exps of tokens [i0, i0 + n) of row b (masked tokens included: their values go unused),
  // as losses::token_exps computes them but with simd::fast_exp.
  template <typename V>
  FASTRL_CPU_INLINE void block_exps(int64_t i0, int64_t n, float* e_ratio, float* e_kl) const {
    if (losses::ratio_uses_exp(p_)) {
      for (int64_t k = 0; k < n; ++k) e_ratio[k] = losses::ratio_exp_arg(p_, log_ratio(i0 + k));
      exp_block<V>(e_ratio, n);
    }
    if (in_.ref != nullptr && losses::kl_uses_exp(p_.kl)) {
      for (int64_t k = 0; k < n; ++k) {
        e_kl[k] = losses::kl_exp_arg(p_.kl, static_cast<float>(in_.logp[i0 + k]), static_cast<float>(in_.ref[i0 + k]));
      }
      exp_block<V>(e_kl, n);
    }
  }

  FASTRL_CPU_INLINE acc_t log_ratio(int64_t i) const { return static_cast<acc_t>(in_.logp[i]) - static_cast<acc_t>(in_.old_logp[i]); }

  int64_t begin(int64_t b) const { return rows_.cu_seqlens ? rows_.cu_seqlens[b] : b * rows_.row_len; }
  int64_t end(int64_t b) const { return rows_.cu_seqlens ? rows_.cu_seqlens[b + 1] : (b + 1) * rows_.row_len; }

  // The first pass, for the kinds that need row sums (others get RowCtx defaults: their row
  // count comes from the token pass); also finds bad mask values.
  FASTRL_CPU_INLINE int64_t row_ctx(int64_t b, losses::RowCtx<acc_t>* ctx) const {
    int64_t bad = -1;
    losses::RowSums sums = losses::row_sums_zero();
    for (int64_t i = begin(b), e = losses::needs_row_pass(p_) ? end(b) : begin(b); i < e; ++i) {
      const int bit = valid_bit(in_.mask[i]);
      if (bit < 0 && bad < 0) bad = i;
      if (bit != 1) continue;
      const Token tok = token(b, i);
      sums = losses::row_sums_add(
          sums, losses::row_sums_token(p_, tok.x, tok.adv, tok.has_is_w ? static_cast<double>(in_.is_w[i]) : -1.0));
    }
    *ctx = losses::row_ctx<acc_t>(p_, sums, in_.is_w != nullptr);
    return bad;
  }

  const LossInputs<scalar_t, mask_t>& in_;
  Rows rows_;
  const losses::Params& p_;
};

// Grain of the row loop: about 32k tokens per task.
inline int64_t grain(const Rows& rows) {
  const int64_t n = rows.cu_seqlens ? rows.cu_seqlens[rows.num_rows] : rows.num_rows * rows.row_len;
  const int64_t avg = rows.num_rows > 0 ? std::max<int64_t>(1, n / rows.num_rows) : 1;
  return std::max<int64_t>(1, (int64_t{1} << 15) / avg);
}

// Rows [b0, b1), compiled per ISA (the whole token pass: the scalar math gains the wider ISAs'
// registers, the exps their lanes; the same bits on every ISA).
template <typename V, typename scalar_t, typename mask_t, typename acc_t>
FASTRL_CPU_INLINE void forward_rows(const RowKernel<scalar_t, mask_t, acc_t>* k, int64_t b0, int64_t b1,
                                    double* stats, acc_t* dpol, acc_t* daux, std::atomic<int64_t>* bad) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t rb = k->template forward<V>(b, stats + b * losses::kNumStats, dpol, daux);
    if (rb >= 0) keep_min(*bad, rb);
  }
}
FASTRL_CPU_ISA_VARIANTS(forward_rows)

template <typename load_t, typename acc_t>
struct GradArgs {
  const load_t* mask;
  Rows rows;
  double g;
  const double* stats;
  const acc_t *dpol, *daux;
  double entropy_coef;
  acc_t *grad_logp, *grad_entropy;
};

// The backward's token loop of one row: branch-free (selects), the inputs' presence fixed at compile
// time, so that GCC vectorizes it for the wrapper's ISA (fp64 token_grad in lanes, same bits).
template <bool kAux, bool kEntropy, typename load_t, typename acc_t>
FASTRL_CPU_INLINE void grad_tokens(const GradArgs<load_t, acc_t>& a, const losses::RowGrad& r, acc_t g_ent,
                                   int64_t begin, int64_t end) {
  const load_t* __restrict mask = a.mask;
  const acc_t* __restrict dpol = a.dpol;
  const acc_t* __restrict daux = a.daux;
  acc_t* __restrict grad_logp = a.grad_logp;
  acc_t* __restrict grad_entropy = a.grad_entropy;
  for (int64_t i = begin; i < end; ++i) {
    const bool valid = valid_bit(mask[i]) == 1;
    const double da = kAux ? static_cast<double>(daux[i]) : 0.0;
    const acc_t g = static_cast<acc_t>(losses::token_grad(r, dpol[i], da));
    grad_logp[i] = valid ? g : acc_t(0);
    if (kEntropy) grad_entropy[i] = valid ? g_ent : acc_t(0);
  }
}

template <typename V, typename load_t, typename acc_t>
FASTRL_CPU_INLINE void backward_rows(const GradArgs<load_t, acc_t>* a, int64_t b0, int64_t b1) {
  const Rows& rows = a->rows;
  for (int64_t b = b0; b < b1; ++b) {
    const losses::RowGrad r = losses::row_grad(a->g, a->stats, b);
    const acc_t g_ent = static_cast<acc_t>(-a->entropy_coef * r.g_aux);
    const int64_t begin = rows.cu_seqlens ? rows.cu_seqlens[b] : b * rows.row_len;
    const int64_t end = rows.cu_seqlens ? rows.cu_seqlens[b + 1] : (b + 1) * rows.row_len;
    if (a->daux) {
      a->grad_entropy ? grad_tokens<true, true>(*a, r, g_ent, begin, end)
                      : grad_tokens<true, false>(*a, r, g_ent, begin, end);
    } else {
      a->grad_entropy ? grad_tokens<false, true>(*a, r, g_ent, begin, end)
                      : grad_tokens<false, false>(*a, r, g_ent, begin, end);
    }
  }
}
FASTRL_CPU_ISA_VARIANTS(backward_rows)

}  // namespace

template <typename scalar_t, typename mask_t, typename acc_t>
int64_t policy_loss_rows(const LossInputs<scalar_t, mask_t>& in, Rows rows, const losses::Params& p,
                         double* stats, acc_t* dpol, acc_t* daux) {
  const RowKernel<scalar_t, mask_t, acc_t> k(in, rows, p);
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, rows.num_rows, grain(rows), [&](int64_t b0, int64_t b1) {
    FASTRL_CPU_ISA_CALL(forward_rows, &k, b0, b1, stats, dpol, daux, &bad);
  });
  return bad.load();
}

double policy_loss_finish(double* stats, int64_t num_rows, const losses::FinishParams& f, const double* counts,
                          float* metrics) {
  losses::Counts c = losses::counts_zero();
  for (int64_t b = 0; b < num_rows; ++b) c = losses::counts_add(c, losses::counts_row(stats + b * losses::kNumStats));
  const losses::AggCounts agg = losses::agg_counts(f, c, counts, num_rows);
  losses::Totals t = losses::totals_zero();
  for (int64_t b = 0; b < num_rows; ++b) {
    t = losses::totals_add(t, losses::totals_row(f, agg, stats + b * losses::kNumStats));
  }
  return losses::finish(f, agg, t, metrics);
}

template <typename mask_t, typename acc_t>
void policy_loss_rows_grad(const mask_t* mask, Rows rows, double g, const double* stats, const acc_t* dpol,
                           const acc_t* daux, double entropy_coef, acc_t* grad_logp, acc_t* grad_entropy) {
  // A bool mask is read as its bytes (0 / 1): GCC does not vectorize loads of bool.
  using load_t = std::conditional_t<std::is_same<mask_t, bool>::value, uint8_t, mask_t>;
  const GradArgs<load_t, acc_t> a{reinterpret_cast<const load_t*>(mask), rows, g, stats, dpol, daux,
                                  entropy_coef, grad_logp, grad_entropy};
  at::parallel_for(0, rows.num_rows, grain(rows), [&](int64_t b0, int64_t b1) {
    FASTRL_CPU_ISA_CALL(backward_rows, &a, b0, b1);
  });
}

#define FASTRL_INSTANTIATE_LOSS(T, M, A)                                                              \
  template int64_t policy_loss_rows<T, M, A>(const LossInputs<T, M>&, Rows, const losses::Params&,   \
                                             double*, A*, A*);
#define FASTRL_INSTANTIATE_LOSS_MASKS(T, A) \
  FASTRL_INSTANTIATE_LOSS(T, bool, A)       \
  FASTRL_INSTANTIATE_LOSS(T, uint8_t, A)    \
  FASTRL_INSTANTIATE_LOSS(T, int32_t, A)    \
  FASTRL_INSTANTIATE_LOSS(T, int64_t, A)    \
  FASTRL_INSTANTIATE_LOSS(T, float, A)      \
  FASTRL_INSTANTIATE_LOSS(T, double, A)
FASTRL_INSTANTIATE_LOSS_MASKS(float, float)
FASTRL_INSTANTIATE_LOSS_MASKS(double, double)
FASTRL_INSTANTIATE_LOSS_MASKS(c10::Half, float)
FASTRL_INSTANTIATE_LOSS_MASKS(c10::BFloat16, float)
#undef FASTRL_INSTANTIATE_LOSS_MASKS
#undef FASTRL_INSTANTIATE_LOSS

#define FASTRL_INSTANTIATE_GRAD(M)                                                                        \
  template void policy_loss_rows_grad<M, float>(const M*, Rows, double, const double*, const float*,          \
                                                const float*, double, float*, float*);                     \
  template void policy_loss_rows_grad<M, double>(const M*, Rows, double, const double*, const double*,        \
                                                 const double*, double, double*, double*);
FASTRL_INSTANTIATE_GRAD(bool)
FASTRL_INSTANTIATE_GRAD(uint8_t)
FASTRL_INSTANTIATE_GRAD(int32_t)
FASTRL_INSTANTIATE_GRAD(int64_t)
FASTRL_INSTANTIATE_GRAD(float)
FASTRL_INSTANTIATE_GRAD(double)
#undef FASTRL_INSTANTIATE_GRAD

}  // namespace cpu
}  // namespace fastrl
