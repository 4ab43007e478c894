// Host tests of the shared group-advantage math (csrc/include/fastrl/advantages.h), the code the
// CPU and CUDA kernels both run. Plain checks, no framework: prints every failed check and exits
// non-zero. Built and run by CMakeLists.txt (ctest: test_header_math); independent of NDEBUG.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "fastrl/advantages.h"

using namespace fastrl;
using namespace fastrl::advantages;

namespace {

// The per-sample advantage of x in a group with accumulator a, as the kernels compute it.
float adv_of(double x, const GroupAccum& a, double batch_var, const Params& p) {
  return advantage(x, coefficients(a, batch_var, p), p);
}


Params make_params(Baseline baseline, Scale scale, bool unbiased = true, double eps = 1e-6,
                   bool eps_on_var = false, bool singleton_zero = false, bool ignore_nan = false) {
  Params p;
  p.baseline = baseline;
  p.scale = scale;
  p.unbiased = unbiased;
  p.eps_on_var = eps_on_var;
  p.singleton_zero = singleton_zero;
  p.ignore_nan = ignore_nan;
  p.eps = eps;
  return p;
}

// What the kernels do for one group: pass 1 then pass 2, members in order.
GroupAccum accumulate(const std::vector<double>& x, const std::vector<double>* w, const Params& p) {
  GroupAccum a = accum_empty();
  for (size_t i = 0; i < x.size(); ++i)
    if (is_member(x[i], p)) accum_first_pass(a, x[i], w ? (*w)[i] : 1.0);
  const double mean = group_mean(a);
  for (size_t i = 0; i < x.size(); ++i)
    if (is_member(x[i], p)) accum_second_pass(a, x[i], mean);
  return a;
}

struct Naive {
  double count, mean, var_biased, var_unbiased, min, max, weight_sum, weighted_mean;
};

// Textbook statistics in long double.
Naive naive(const std::vector<double>& x, const std::vector<double>& w) {
  long double n = 0, s = 0, ws = 0, wxs = 0;
  double mn = INFINITY, mx = -INFINITY;
  for (size_t i = 0; i < x.size(); ++i) {
    n += 1;
    s += x[i];
    ws += w[i];
    wxs += static_cast<long double>(w[i]) * x[i];
    mn = std::fmin(mn, x[i]);
    mx = std::fmax(mx, x[i]);
  }
  const long double mean = s / n;
  long double ss = 0;
  for (double v : x) ss += (v - mean) * (v - mean);
  Naive r;
  r.count = static_cast<double>(n);
  r.mean = static_cast<double>(mean);
  r.var_biased = static_cast<double>(ss / n);
  r.var_unbiased = n > 1 ? static_cast<double>(ss / (n - 1)) : NAN;
  r.min = mn;
  r.max = mx;
  r.weight_sum = static_cast<double>(ws);
  r.weighted_mean = static_cast<double>(wxs / ws);
  return r;
}

void test_scalar_helpers() {
  CHECK(std::isnan(nan_min(NAN, 1.0)));
  CHECK(std::isnan(nan_min(1.0, NAN)));
  CHECK(std::isnan(nan_max(NAN, 1.0)));
  CHECK(std::isnan(nan_max(1.0, NAN)));
  CHECK(nan_min(1.0, 2.0) == 1.0 && nan_min(2.0, 1.0) == 1.0);
  CHECK(nan_max(1.0, 2.0) == 2.0 && nan_max(2.0, 1.0) == 2.0);
  CHECK(nan_min(INFINITY, -3.0) == -3.0 && nan_max(-INFINITY, -3.0) == -3.0);
  CHECK(mul_rn(3.0, 7.0) == 21.0);
  const double a = 0.1, b = 0.7;
  CHECK(mul_rn(a, b) == a * b);

  CHECK(std::isnan(variance(0.0, 0.0, false)));  // no member
  CHECK(std::isnan(variance(0.0, 1.0, true)));   // one member, unbiased
  CHECK(variance(0.0, 1.0, false) == 0.0);
  CHECK(variance(6.0, 4.0, true) == 2.0);
  CHECK(variance(6.0, 4.0, false) == 1.5);

  const GroupAccum e = accum_empty();
  CHECK(e.count == 0.0 && e.sum == 0.0 && e.m2 == 0.0 && e.weight_sum == 0.0);
  CHECK(std::isinf(e.min) && e.min > 0 && std::isinf(e.max) && e.max < 0);

  const Params p = make_params(Baseline::kMean, Scale::kGroupStd);
  CHECK(is_member(1.0, p) && is_member(NAN, p));
  const Params q = make_params(Baseline::kMean, Scale::kGroupStd, true, 1e-6, false, false, true);
  CHECK(is_member(1.0, q) && !is_member(NAN, q) && is_member(INFINITY, q));
}

// Two-pass statistics against a naive long-double computation, on random groups.
void test_two_pass_vs_naive() {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> normal(5.0, 3.0);
  std::uniform_real_distribution<double> uniform(1.0, 100.0);
  const Params p = make_params(Baseline::kMean, Scale::kGroupStd);
  for (int size : {1, 2, 3, 7, 16, 64, 1000}) {
    for (int rep = 0; rep < 5; ++rep) {
      std::vector<double> x(size), w(size);
      for (int i = 0; i < size; ++i) {
        x[i] = normal(rng);
        w[i] = uniform(rng);
      }
      const GroupAccum a = accumulate(x, &w, p);
      const Naive r = naive(x, w);
      CHECK(a.count == r.count);
      CHECK_NEAR(group_mean(a), r.mean, 1e-13);
      CHECK_NEAR(variance(a.m2, a.count, false), r.var_biased, 1e-12);
      CHECK_NEAR(variance(a.m2, a.count, true), r.var_unbiased, 1e-12);
      CHECK(a.min == r.min && a.max == r.max);
      CHECK_NEAR(a.weight_sum, r.weight_sum, 1e-13);
      CHECK_NEAR(a.weighted_sum / a.weight_sum, r.weighted_mean, 1e-12);
      CHECK(a.m2 >= 0.0);
    }
  }
  // Without weights the kernels pass w = 1: weight_sum == count, weighted mean == mean.
  std::vector<double> x = {1.5, -2.0, 4.25, 8.0};
  const GroupAccum a = accumulate(x, nullptr, p);
  CHECK(a.weight_sum == a.count && a.weighted_sum == a.sum);
}

// Constant groups of dyadic values (rewards 0/1, +-1, 0.5...) sum exactly: m2 == 0 and the
// advantage is exactly 0, not rounding noise divided by eps. (For a non-dyadic constant such as
// 0.1 the fp64 mean need not equal the value, so m2 is ~1e-34, not 0: A stays ~1e-11, not 0.)
void test_constant_groups() {
  for (double v : {0.0, 1.0, -1.0, 0.5, 3.0}) {
    for (int n : {2, 3, 8, 16}) {
      const std::vector<double> x(n, v);
      for (bool eps_on_var : {false, true}) {
        const Params p = make_params(Baseline::kMean, Scale::kGroupStd, true, 1e-6, eps_on_var);
        const GroupAccum a = accumulate(x, nullptr, p);
        CHECK(a.m2 == 0.0);
        CHECK(adv_of(v, a, 0.0, p) == 0.0f);
      }
    }
  }
  const std::vector<double> x(7, 0.1);
  const Params p = make_params(Baseline::kMean, Scale::kGroupStd, true, 1e-6);
  const GroupAccum a = accumulate(x, nullptr, p);
  CHECK(std::fabs(adv_of(0.1, a, 0.0, p)) < 1e-9f);
}

// Chan merges of per-group summaries (in group order, and in batch_variance's chunks + tree order)
// against the statistics of the whole batch; groups from 1 to past kBatchChunks.
void test_moments_merge() {
  std::mt19937_64 rng(99);
  std::normal_distribution<double> normal(-1.0, 2.0);
  std::uniform_int_distribution<int> sizes(0, 20);  // empty groups included
  const Params p = make_params(Baseline::kMean, Scale::kBatchStd);
  for (int rep = 0; rep < 20; ++rep) {
    const int num_groups = rep < 19 ? 1 + rep * 3 : 3 * kBatchChunks + 7;
    std::vector<GroupAccum> acc;
    std::vector<double> all;
    for (int g = 0; g < num_groups; ++g) {
      std::vector<double> x(sizes(rng));
      for (double& v : x) v = normal(rng);
      acc.push_back(accumulate(x, nullptr, p));
      all.insert(all.end(), x.begin(), x.end());
    }
    const GroupAccum whole = accumulate(all, nullptr, p);
    Moments m = moments_empty();
    for (const GroupAccum& g : acc) m = moments_merge(m, group_moments(g));
    CHECK(m.count == whole.count);
    if (all.empty()) {
      CHECK(std::isnan(batch_variance(acc.data(), num_groups, true)));
      continue;
    }
    CHECK_NEAR(m.mean, group_mean(whole), 1e-12);
    CHECK_NEAR(m.m2, whole.m2, 1e-11);
    for (bool unbiased : {false, true}) {
      const double bv = batch_variance(acc.data(), num_groups, unbiased);
      CHECK_NEAR(bv, variance(whole.m2, whole.count, unbiased), 1e-11);
      const std::vector<double> ones(all.size(), 1.0);
      const Naive r = naive(all, ones);
      CHECK_NEAR(bv, unbiased ? r.var_unbiased : r.var_biased, 1e-11);
    }
  }
  // Merging an empty group changes nothing; merging into empty copies the group.
  const std::vector<double> x = {1.0, 2.0, 4.0};
  const GroupAccum g = accumulate(x, nullptr, p);
  const Moments one = moments_merge(moments_empty(), group_moments(g));
  CHECK(one.count == 3.0 && one.mean == group_mean(g) && one.m2 == g.m2);
  const Moments same = moments_merge(one, group_moments(accum_empty()));
  CHECK(same.count == one.count && same.mean == one.mean && same.m2 == one.m2);
  // One valid sample in the whole batch: unbiased batch variance undefined.
  const GroupAccum single = accumulate({2.0}, nullptr, p);
  CHECK(std::isnan(batch_variance(&single, 1, true)));
  CHECK(batch_variance(&single, 1, false) == 0.0);
}

void test_advantage_baselines_and_scales() {
  const std::vector<double> x = {1.0, 2.0, 3.0, 6.0};  // mean 3, m2 = 14
  const std::vector<double> w = {1.0, 1.0, 2.0, 4.0};  // weighted mean (1+2+6+24)/8 = 33/8
  const double eps = 1e-6;
  const double var_u = 14.0 / 3.0, var_b = 14.0 / 4.0;
  const double bv = 2.25;  // an arbitrary batch variance

  // GRPO: (x - mean) / (std + eps), unbiased and biased.
  {
    const Params p = make_params(Baseline::kMean, Scale::kGroupStd, true, eps);
    const GroupAccum a = accumulate(x, &w, p);
    CHECK(a.m2 == 14.0);
    for (double v : x) CHECK_NEAR(adv_of(v, a, 0.0, p), (v - 3.0) / (std::sqrt(var_u) + eps), 1e-6);
    const Params b = make_params(Baseline::kMean, Scale::kGroupStd, false, eps);
    for (double v : x) CHECK_NEAR(adv_of(v, a, 0.0, b), (v - 3.0) / (std::sqrt(var_b) + eps), 1e-6);
  }
  // eps on the variance: (x - mean) / sqrt(var + eps).
  {
    const Params p = make_params(Baseline::kMean, Scale::kGroupStd, true, 1e-2, true);
    const GroupAccum a = accumulate(x, &w, p);
    for (double v : x) CHECK_NEAR(adv_of(v, a, 0.0, p), (v - 3.0) / std::sqrt(var_u + 1e-2), 1e-6);
    const Params q = make_params(Baseline::kMean, Scale::kGroupStd, true, 1e-2, false);
    CHECK(adv_of(6.0, a, 0.0, p) != adv_of(6.0, a, 0.0, q));
  }
  // Dr.GRPO: mean baseline, no scale.
  {
    const Params p = make_params(Baseline::kMean, Scale::kNone);
    const GroupAccum a = accumulate(x, &w, p);
    for (double v : x) CHECK(adv_of(v, a, 0.0, p) == static_cast<float>(v - 3.0));
  }
  // RLOO: x - mean of the others == n / (n - 1) * (x - mean).
  {
    const Params p = make_params(Baseline::kLeaveOneOut, Scale::kNone);
    const GroupAccum a = accumulate(x, &w, p);
    for (double v : x) CHECK_NEAR(adv_of(v, a, 0.0, p), v - (12.0 - v) / 3.0, 1e-6);
    const Params s = make_params(Baseline::kLeaveOneOut, Scale::kGroupStd, true, eps);
    for (double v : x)
      CHECK_NEAR(adv_of(v, a, 0.0, s), (v - (12.0 - v) / 3.0) / (std::sqrt(var_u) + eps), 1e-6);
  }
  // OPO: weighted-mean baseline.
  {
    const Params p = make_params(Baseline::kWeightedMean, Scale::kNone);
    const GroupAccum a = accumulate(x, &w, p);
    for (double v : x) CHECK_NEAR(adv_of(v, a, 0.0, p), v - 33.0 / 8.0, 1e-6);
  }
  // No baseline.
  {
    const Params p = make_params(Baseline::kNone, Scale::kNone);
    const GroupAccum a = accumulate(x, &w, p);
    for (double v : x) CHECK(adv_of(v, a, 0.0, p) == static_cast<float>(v));
    const Params s = make_params(Baseline::kNone, Scale::kGroupStd, true, eps);
    for (double v : x) CHECK_NEAR(adv_of(v, a, 0.0, s), v / (std::sqrt(var_u) + eps), 1e-6);
  }
  // REINFORCE++-baseline style: group mean, batch std (the group's own variance is not read).
  {
    const Params p = make_params(Baseline::kMean, Scale::kBatchStd, true, eps);
    const GroupAccum a = accumulate(x, &w, p);
    for (double v : x) CHECK_NEAR(adv_of(v, a, bv, p), (v - 3.0) / (std::sqrt(bv) + eps), 1e-6);
    const Params q = make_params(Baseline::kMean, Scale::kBatchStd, true, eps, true);
    for (double v : x) CHECK_NEAR(adv_of(v, a, bv, q), (v - 3.0) / std::sqrt(bv + eps), 1e-6);
  }
}

void test_singletons() {
  const std::vector<double> x = {2.5};
  const double eps = 1e-6, bv = 4.0;
  for (Baseline b : {Baseline::kMean, Baseline::kLeaveOneOut, Baseline::kWeightedMean,
                     Baseline::kNone}) {
    for (Scale s : {Scale::kGroupStd, Scale::kBatchStd, Scale::kNone}) {
      const Params zero = make_params(b, s, true, eps, false, true);
      const GroupAccum a = accumulate(x, nullptr, zero);
      CHECK(adv_of(2.5, a, bv, zero) == 0.0f);
      // singleton_zero off: baseline 0, group std 1.
      const Params keep = make_params(b, s, true, eps, false, false);
      const double expect = s == Scale::kGroupStd   ? 2.5 / (1.0 + eps)
                            : s == Scale::kBatchStd ? 2.5 / (std::sqrt(bv) + eps)
                                                    : 2.5;
      CHECK_NEAR(adv_of(2.5, a, bv, keep), expect, 1e-6);
    }
  }
  // Reported statistics of a singleton: std NaN when unbiased, 0 when biased.
  int64_t count[1];
  float mean[1], stdv[1], mn[1], mx[1];
  const StatsOut out = {count, mean, stdv, mn, mx};
  const Params p = make_params(Baseline::kMean, Scale::kGroupStd);
  const GroupAccum a = accumulate(x, nullptr, p);
  write_stats(out, 0, a, true);
  CHECK(count[0] == 1 && mean[0] == 2.5f && std::isnan(stdv[0]) && mn[0] == 2.5f && mx[0] == 2.5f);
  write_stats(out, 0, a, false);
  CHECK(stdv[0] == 0.0f);
}

void test_nan_scores() {
  const std::vector<double> x = {1.0, NAN, 3.0};
  int64_t count[1];
  float mean[1], stdv[1], mn[1], mx[1];
  const StatsOut out = {count, mean, stdv, mn, mx};
  // ignore_nan: the NaN is not a member (A = 0) and the others see a group of 2.
  {
    const Params p = make_params(Baseline::kMean, Scale::kGroupStd, true, 1e-6, false, false, true);
    const GroupAccum a = accumulate(x, nullptr, p);
    CHECK(a.count == 2.0 && group_mean(a) == 2.0 && a.m2 == 2.0);
    CHECK(adv_of(NAN, a, 0.0, p) == 0.0f);
    CHECK_NEAR(adv_of(3.0, a, 0.0, p), 1.0 / (std::sqrt(2.0) + 1e-6), 1e-6);
    write_stats(out, 0, a, true);
    CHECK(count[0] == 2 && mean[0] == 2.0f && mn[0] == 1.0f && mx[0] == 3.0f);
    // A NaN member left alone in its group is a singleton of the rest, or an empty group.
    const GroupAccum lone = accumulate({NAN, 4.0}, nullptr, p);
    CHECK(lone.count == 1.0);
    const GroupAccum none = accumulate({NAN, NAN}, nullptr, p);
    CHECK(none.count == 0.0 && adv_of(NAN, none, 0.0, p) == 0.0f);
  }
  // Otherwise the NaN propagates into the whole group's statistics and advantages.
  {
    const Params p = make_params(Baseline::kMean, Scale::kGroupStd);
    const GroupAccum a = accumulate(x, nullptr, p);
    CHECK(a.count == 3.0 && std::isnan(group_mean(a)));
    CHECK(std::isnan(adv_of(1.0, a, 0.0, p)) && std::isnan(adv_of(NAN, a, 0.0, p)));
    write_stats(out, 0, a, true);
    CHECK(count[0] == 3 && std::isnan(mean[0]) && std::isnan(stdv[0]) && std::isnan(mn[0]) &&
          std::isnan(mx[0]));
  }
}

void test_empty_group_stats() {
  int64_t count[1];
  float mean[1], stdv[1], mn[1], mx[1];
  const StatsOut out = {count, mean, stdv, mn, mx};
  for (bool unbiased : {false, true}) {
    write_stats(out, 0, accum_empty(), unbiased);
    CHECK(count[0] == 0 && std::isnan(mean[0]) && std::isnan(stdv[0]) && std::isnan(mn[0]) &&
          std::isnan(mx[0]));
  }
  // write_stats writes entry g only.
  int64_t counts[3] = {-1, -1, -1};
  float m3[3] = {-1, -1, -1}, s3[3] = {-1, -1, -1}, lo3[3] = {-1, -1, -1}, hi3[3] = {-1, -1, -1};
  const StatsOut out3 = {counts, m3, s3, lo3, hi3};
  const Params p = make_params(Baseline::kMean, Scale::kGroupStd);
  write_stats(out3, 1, accumulate({1.0, 3.0}, nullptr, p), true);
  CHECK(counts[0] == -1 && counts[2] == -1 && m3[0] == -1.0f && s3[2] == -1.0f);
  CHECK(counts[1] == 2 && m3[1] == 2.0f && lo3[1] == 1.0f && hi3[1] == 3.0f);
  CHECK_NEAR(s3[1], std::sqrt(2.0), 1e-6);
}

}  // namespace

int main() {
  test_scalar_helpers();
  test_two_pass_vs_naive();
  test_constant_groups();
  test_moments_merge();
  test_advantage_baselines_and_scales();
  test_singletons();
  test_nan_scores();
  test_empty_group_stats();
  return check_summary("test_header_math");
}
