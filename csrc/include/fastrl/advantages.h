// Group-advantage math shared by the CPU and CUDA kernels.
//
// Statistics are accumulated in fp64 in two passes over each group's members, in sample order:
//   pass 1: count, sum, weighted sum, min, max       pass 2: m2 = sum (x - mean)^2
// The two-pass variance is exact for constant groups (m2 == 0, so a zero-variance group gets a
// zero advantage, not rounding noise / eps) and the fixed member order makes every result
// bitwise reproducible whatever the thread count or grid shape.
#pragma once

#include "fastrl/common.h"

namespace fastrl {
namespace advantages {

enum class Baseline : int32_t {
  kMean = 0,          // b = mean_g(x)                                  (GRPO)
  kLeaveOneOut = 1,   // b = mean of the other members: A = n/(n-1) (x - mean)   (RLOO)
  kWeightedMean = 2,  // b = sum_g(w x) / sum_g(w), w = e.g. response length     (OPO)
  kNone = 3,          // b = 0
};

enum class Scale : int32_t {
  kGroupStd = 0,  // divide by the group's std
  kBatchStd = 1,  // divide by the std of all (valid) samples of the batch
  kNone = 2,      // no division
};

struct Params {
  Baseline baseline;
  Scale scale;
  bool unbiased;        // std with Bessel's correction (n - 1) or the biased one (n)
  bool eps_on_var;      // (x - b) / sqrt(var + eps) instead of (x - b) / (std + eps)
  bool singleton_zero;  // a group with one valid member gets A = 0; otherwise b = 0, std = 1
  bool ignore_nan;      // NaN scores are not members of any statistic and get A = 0
  double eps;
};

// Per-group accumulator. `count` is the number of valid members (NaNs excluded when ignore_nan).
struct GroupAccum {
  double count;
  double sum;
  double weight_sum;
  double weighted_sum;
  double min;
  double max;
  double m2;
};

FASTRL_HOST_DEVICE GroupAccum accum_empty() {
  GroupAccum a;
  a.count = 0.0;
  a.sum = 0.0;
  a.weight_sum = 0.0;
  a.weighted_sum = 0.0;
  a.min = INFINITY;
  a.max = -INFINITY;
  a.m2 = 0.0;
  return a;
}

FASTRL_HOST_DEVICE bool is_member(double x, const Params& p) { return !(p.ignore_nan && x != x); }

FASTRL_HOST_DEVICE void accum_first_pass(GroupAccum& a, double x, double w) {
  a.count += 1.0;
  a.sum += x;
  a.weight_sum += w;
  a.weighted_sum += mul_rn(w, x);
  a.min = nan_min(a.min, x);
  a.max = nan_max(a.max, x);
}

FASTRL_HOST_DEVICE double group_mean(const GroupAccum& a) { return a.sum / a.count; }

FASTRL_HOST_DEVICE void accum_second_pass(GroupAccum& a, double x, double mean) {
  const double d = x - mean;
  a.m2 += mul_rn(d, d);
}

// Variance of a group of `count` members with sum of squared deviations `m2`; NaN where the
// estimator is undefined (no member, or one member with the unbiased estimator).
FASTRL_HOST_DEVICE double variance(double m2, double count, bool unbiased) {
  const double dof = unbiased ? count - 1.0 : count;
  return dof > 0.0 ? m2 / dof : NAN;
}

// The batch statistics merge per-group (count, mean, m2) summaries (common.h's Moments) in a
// fixed order, so the result is deterministic and the same on the CPU and the GPU.
FASTRL_HOST_DEVICE Moments group_moments(const GroupAccum& g) {
  Moments m;
  m.count = g.count;
  m.mean = g.count == 0.0 ? 0.0 : group_mean(g);
  m.m2 = g.m2;
  return m;
}

// The batch variance merges the groups in kBatchChunks contiguous chunks (each in index order),
// then the chunks pairwise in a fixed tree: one GPU block runs the chunks in parallel (a merge per
// group in one sequence took ~1 ms for 4,096 groups on an H100: each merge waits on the last).
constexpr int kBatchChunks = 256;

FASTRL_HOST_DEVICE Moments chunk_moments(const GroupAccum* acc, int64_t num_groups, int chunk) {
  const int64_t size = (num_groups + kBatchChunks - 1) / kBatchChunks;
  const int64_t begin = chunk * size;
  const int64_t end = begin + size < num_groups ? begin + size : num_groups;
  Moments m = moments_empty();
  for (int64_t g = begin; g < end; ++g) m = moments_merge(m, group_moments(acc[g]));
  return m;
}

// One level of the tree over `part[kBatchChunks]` (stride 1, 2, 4, ...): part[c] absorbs part[c + s]
// for c a multiple of 2s. After log2(kBatchChunks) levels part[0] holds the batch.
FASTRL_HOST_DEVICE void tree_level(Moments* part, int c, int s) {
  if (c % (2 * s) == 0 && c + s < kBatchChunks) part[c] = moments_merge(part[c], part[c + s]);
}

// Variance of all valid samples of the batch (the host version of the GPU's merge order).
inline double batch_variance(const GroupAccum* acc, int64_t num_groups, bool unbiased) {
  Moments part[kBatchChunks];
  for (int c = 0; c < kBatchChunks; ++c) part[c] = chunk_moments(acc, num_groups, c);
  for (int s = 1; s < kBatchChunks; s *= 2)
    for (int c = 0; c < kBatchChunks; c += 2 * s) tree_level(part, c, s);
  return variance(part[0].m2, part[0].count, unbiased);
}

// The per-group statistics returned to the user (fp32, count as int64). A group with no valid
// member reports NaN mean/std/min/max; a singleton reports std NaN when unbiased.
struct StatsOut {
  int64_t* count;
  float* mean;
  float* std;
  float* min;
  float* max;
};

FASTRL_HOST_DEVICE void write_stats(const StatsOut& out, int64_t g, const GroupAccum& a,
                                    bool unbiased) {
  const bool empty = a.count == 0.0;
  out.count[g] = static_cast<int64_t>(a.count);
  out.mean[g] = empty ? NAN : static_cast<float>(group_mean(a));
  out.std[g] = static_cast<float>(sqrt(variance(a.m2, a.count, unbiased)));
  out.min[g] = empty ? NAN : static_cast<float>(a.min);
  out.max[g] = empty ? NAN : static_cast<float>(a.max);
}

// A group's advantage rule, computed once per group: A = (x - shift) * factor / denom, or 0 for
// every member when `zero` (a singleton under singleton_zero). factor is 1 except for the
// leave-one-out baseline, shift 0 and denom 1 where there is no baseline / no scaling: those are
// exact operations, so A rounds exactly as the textbook formula (x - b) / s written per case.
struct Coefficients {
  double shift;
  double factor;
  double denom;
  bool zero;
};

// `batch_var` is only read when p.scale == Scale::kBatchStd.
FASTRL_HOST_DEVICE Coefficients coefficients(const GroupAccum& g, double batch_var,
                                             const Params& p) {
  Coefficients c;
  const double n = g.count;
  const bool singleton = n == 1.0;  // passthrough rule: baseline 0 and group std 1
  c.zero = singleton && p.singleton_zero;
  c.shift = 0.0;
  c.factor = 1.0;
  if (!singleton) {
    switch (p.baseline) {
      case Baseline::kMean:
        c.shift = group_mean(g);
        break;
      case Baseline::kLeaveOneOut:  // x - (sum - x) / (n - 1) = (x - mean) n / (n - 1)
        c.shift = group_mean(g);
        c.factor = n / (n - 1.0);
        break;
      case Baseline::kWeightedMean:
        c.shift = g.weighted_sum / g.weight_sum;
        break;
      default:
        break;
    }
  }
  double var;
  switch (p.scale) {
    case Scale::kGroupStd:
      var = singleton ? 1.0 : variance(g.m2, n, p.unbiased);
      break;
    case Scale::kBatchStd:
      var = batch_var;
      break;
    default:
      c.denom = 1.0;
      return c;
  }
  c.denom = p.eps_on_var ? sqrt(var + p.eps) : sqrt(var) + p.eps;
  return c;
}

// The advantage of a sample x of a group with coefficients c (0 for a NaN under ignore_nan).
FASTRL_HOST_DEVICE float advantage(double x, const Coefficients& c, const Params& p) {
  if (!is_member(x, p) || c.zero) return 0.0f;
  return static_cast<float>((x - c.shift) * c.factor / c.denom);
}

}  // namespace advantages
}  // namespace fastrl
