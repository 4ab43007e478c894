// CPU kernels of the best-of-N / selection family.
//
// best_of_n: the samples are split into T contiguous chunks, each walked once in index order into
// its own table of per-group top-k lists (fastrl/selection.h); then, in parallel over groups, the
// T lists of each group are merged into the first. No sort, no per-group member lists. The top-k
// order is total, so the result does not depend on T or on the thread count, bitwise.
// T = the thread count, fewer for small batches (a chunk is at least kMinChunk samples) and when
// the tables would pass kTableBudget bytes (T * G * k * 16 bytes). Cost: O(B) reads, O(k) per
// member that enters a list (few for random order), O(T G k) for the merge.
//
// expected_best_of_k: a counting sort gathers each group's values (two sequential O(B) passes),
// then the groups, in parallel, are sorted best first and summed with the order-statistic weights
// of fastrl/selection.h, in rank order: bitwise the same whatever the thread count.
//
// maj_at_k: the same counting sort gathers each group's (answer, correct) pairs; then, in parallel
// over groups, a sort by answer gives the answer classes and one dynamic program over vote counts
// (below) gives every k of the list at once. Sequential within a group: thread-count independent.
#include "cpu/selection.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>
#include <vector>

namespace fastrl {
namespace cpu {
namespace {

constexpr int64_t kMinChunk = 16384;
constexpr int64_t kTableBudget = int64_t{64} << 20;

// Counting sort of the samples by group: start[num_groups + 1] offsets, and order[B] the sample
// indices grouped, each group in index order. Returns -1, or the first sample whose group id lies
// outside [0, num_groups).
int64_t group_by(const int64_t* group_ids, int64_t num_samples, int64_t num_groups,
                 std::vector<int64_t>& start, std::vector<int64_t>& order) {
  start.assign(static_cast<size_t>(num_groups) + 1, 0);
  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t g = group_ids[i];
    if (g < 0 || g >= num_groups) return i;
    ++start[g + 1];
  }
  for (int64_t g = 0; g < num_groups; ++g) start[g + 1] += start[g];
  order.resize(static_cast<size_t>(num_samples));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < num_samples; ++i) order[fill[group_ids[i]]++] = i;
  return -1;
}

// Exact E[majority vote of a uniform k-subset is correct] of one group, for every k <= kmax
// (num[k] / den[k] on return, k = 1..kmax; kmax <= the group's size). The group has answer classes
// of sizes size[j], correct or not; a subset draws c_j of class j with weight prod_j C(size_j, c_j)
// out of C(n, k) subsets. For every winner vote count t, dp[s][a][b] sums the weights of the
// draws of s samples from the classes seen so far with every c_j <= t and a correct / b wrong
// classes at exactly t; after the last class, the states s = k with a + b > 0 are the subsets
// whose winner has t votes, correct with probability a / (a + b) (uniform tie-break). Summed
// over t, num[k] adds those weights times a / (a + b) and den[k] the weights themselves: den[k]
// is C(n, k), computed from the same numbers. The binomials are scaled by rho^c with
// rho = C(n, kmax)^(-1/kmax) (a common factor rho^k of num[k] and den[k], which cancels) so that no
// weight overflows for kmax <= kMaxMajK: all terms are positive, so fp64 keeps ~1e-15 relative
// accuracy. Cost O(A kmax^3 log kmax) for A classes.
constexpr int64_t kMaxMajK = 1000;

void maj_vote_dp(const std::vector<std::pair<int64_t, bool>>& classes, int64_t n, int64_t kmax,
                 std::vector<double>& num, std::vector<double>& den, std::vector<double>& dp,
                 std::vector<double>& chat) {
  double log_c = 0.0;  // log C(n, kmax)
  for (int64_t i = 0; i < kmax; ++i) {
    log_c += std::log(static_cast<double>(n - i) / static_cast<double>(kmax - i));
  }
  const double rho = std::exp(-log_c / static_cast<double>(kmax));
  const int64_t A = static_cast<int64_t>(classes.size());
  const int64_t width = kmax + 1;
  chat.assign(static_cast<size_t>(A * width), 0.0);  // chat[j][c] = C(size_j, c) rho^c
  for (int64_t j = 0; j < A; ++j) {
    const int64_t m = classes[j].first;
    double* row = chat.data() + j * width;
    row[0] = 1.0;
    for (int64_t c = 0; c < std::min(m, kmax); ++c) {
      row[c + 1] = row[c] * rho * static_cast<double>(m - c) / static_cast<double>(c + 1);
    }
  }
  num.assign(static_cast<size_t>(width), 0.0);
  den.assign(static_cast<size_t>(width), 0.0);
  for (int64_t t = 1; t <= kmax; ++t) {
    int64_t n_ok = 0, n_bad = 0;  // classes that can reach t votes
    for (const auto& c : classes) {
      if (c.first >= t) (c.second ? n_ok : n_bad) += 1;
    }
    const int64_t amax = std::min(n_ok, kmax / t), bmax = std::min(n_bad, kmax / t);
    const int64_t na = amax + 1, nb = bmax + 1;
    dp.assign(static_cast<size_t>(width * na * nb), 0.0);
    auto cell = [&](int64_t s, int64_t a, int64_t b) -> double& { return dp[(s * na + a) * nb + b]; };
    cell(0, 0, 0) = 1.0;
    for (int64_t j = 0; j < A; ++j) {
      const int64_t m = classes[j].first;
      const bool ok = classes[j].second;
      const double* row = chat.data() + j * width;
      // in place, by decreasing s: a state only reads states of smaller s (not yet updated)
      for (int64_t s = kmax; s >= 1; --s) {
        const int64_t cmax = std::min({m, t, s});
        for (int64_t a = 0; a < na; ++a) {
          for (int64_t b = 0; b < nb; ++b) {
            double acc = cell(s, a, b);
            for (int64_t c = 1; c <= cmax; ++c) {
              if (c < t) {
                acc += cell(s - c, a, b) * row[c];
              } else if (ok ? a > 0 : b > 0) {  // c == t: this class joins the winners
                acc += cell(s - c, a - ok, b - !ok) * row[c];
              }
            }
            cell(s, a, b) = acc;
          }
        }
      }
    }
    for (int64_t k = t; k <= kmax; ++k) {  // a winner with t votes needs k >= t
      for (int64_t a = 0; a < na; ++a) {
        for (int64_t b = (a == 0); b < nb; ++b) {
          const double w = cell(k, a, b);
          num[k] += w * static_cast<double>(a) / static_cast<double>(a + b);
          den[k] += w;
        }
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
int64_t best_of_n(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                  int64_t num_groups, int64_t k, bool largest, int64_t* out) {
  const int64_t slots = num_groups * k;
  const int64_t by_size = std::max<int64_t>(1, num_samples / kMinChunk);
  const int64_t by_memory = std::max<int64_t>(1, kTableBudget / std::max<int64_t>(1, slots * 16));
  const int64_t tables = std::min<int64_t>({at::get_num_threads(), by_size, by_memory});
  std::vector<double> keys(static_cast<size_t>(tables * slots));
  std::vector<int64_t> idx(static_cast<size_t>(tables * slots));
  std::vector<int64_t> first_bad(static_cast<size_t>(tables), -1);
  at::parallel_for(0, tables, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      double* key = keys.data() + t * slots;
      int64_t* ix = idx.data() + t * slots;
      for (int64_t g = 0; g < num_groups; ++g) selection::topk_clear(key + g * k, ix + g * k, k);
      const int64_t end = num_samples * (t + 1) / tables;
      for (int64_t i = num_samples * t / tables; i < end; ++i) {
        const int64_t g = group_ids[i];
        if (g < 0 || g >= num_groups) {
          first_bad[t] = i;
          break;
        }
        const double x = static_cast<double>(scores[i]);
        if (x != x) continue;  // NaN: never selected
        selection::topk_offer(key + g * k, ix + g * k, k, selection::topk_key(x, largest), i);
      }
    }
  });
  for (int64_t t = 0; t < tables; ++t) {
    if (first_bad[t] >= 0) return first_bad[t];
  }
  at::parallel_for(0, num_groups, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      double* key = keys.data() + g * k;
      int64_t* ix = idx.data() + g * k;
      for (int64_t t = 1; t < tables; ++t) {
        const int64_t base = t * slots + g * k;
        for (int64_t j = 0; j < k && idx[base + j] != selection::kNoSample; ++j) {
          selection::topk_offer(key, ix, k, keys[base + j], idx[base + j]);
        }
      }
      selection::topk_write(ix, k, out + g * k);
    }
  });
  return -1;
}

template <typename scalar_t>
int64_t expected_best_of_k(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                           int64_t num_groups, const int64_t* ks, int64_t num_k, bool replacement,
                           bool largest, double* out) {
  std::vector<int64_t> start, order;
  const int64_t bad = group_by(group_ids, num_samples, num_groups, start, order);
  if (bad >= 0) return bad;
  std::vector<double> vals(static_cast<size_t>(num_samples));
  for (int64_t p = 0; p < num_samples; ++p) vals[p] = static_cast<double>(scores[order[p]]);
  at::parallel_for(0, num_groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      double* v = vals.data() + start[g];
      const int64_t n = start[g + 1] - start[g];
      if (std::any_of(v, v + n, [](double x) { return x != x; })) {  // (and NaN can't be sorted)
        for (int64_t j = 0; j < num_k; ++j) out[g * num_k + j] = NAN;
        continue;
      }
      if (largest) {
        std::sort(v, v + n, std::greater<double>());
      } else {
        std::sort(v, v + n);
      }
      for (int64_t j = 0; j < num_k; ++j) {
        out[g * num_k + j] = selection::expected_best(v, 1, n, ks[j], replacement);
      }
    }
  });
  return -1;
}

MajStatus maj_at_k(const int64_t* answer_ids, const bool* correct, const int64_t* group_ids,
                   int64_t num_samples, int64_t num_groups, const int64_t* ks, int64_t num_k,
                   double* out) {
  MajStatus status;
  std::vector<int64_t> start, order;
  status.bad_group_sample = group_by(group_ids, num_samples, num_groups, start, order);
  if (status.bad_group_sample >= 0) return status;
  const int64_t k_max = *std::max_element(ks, ks + num_k);
  enum : uint8_t { kOk, kMixed, kTooLarge };
  std::vector<uint8_t> flag(static_cast<size_t>(num_groups), kOk);
  std::vector<int64_t> mixed_answer(static_cast<size_t>(num_groups), 0);
  at::parallel_for(0, num_groups, 16, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, bool>> votes, classes;
    std::vector<double> num, den, dp, chat;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = start[g + 1] - start[g];
      double* row = out + g * num_k;
      std::fill(row, row + num_k, NAN);
      const int64_t kmax = std::min(k_max, n);
      if (kmax == 0) continue;
      if (kmax > kMaxMajK) {
        flag[g] = kTooLarge;
        continue;
      }
      votes.clear();
      for (int64_t p = start[g]; p < start[g + 1]; ++p) {
        votes.emplace_back(answer_ids[order[p]], correct[order[p]]);
      }
      std::sort(votes.begin(), votes.end());  // by answer id: classes in a fixed order
      classes.clear();
      for (size_t p = 0; p < votes.size(); ++p) {
        if (p == 0 || votes[p].first != votes[p - 1].first) {
          classes.emplace_back(1, votes[p].second);
        } else if (votes[p].second != votes[p - 1].second) {
          flag[g] = kMixed;
          mixed_answer[g] = votes[p].first;
          break;
        } else {
          classes.back().first += 1;
        }
      }
      if (flag[g] != kOk) continue;
      maj_vote_dp(classes, n, kmax, num, den, dp, chat);
      for (int64_t j = 0; j < num_k; ++j) {
        if (ks[j] <= n) row[j] = num[ks[j]] / den[ks[j]];
      }
    }
  });
  for (int64_t g = 0; g < num_groups; ++g) {  // the first bad group, whatever the thread count
    if (flag[g] == kMixed) {
      status.mixed_group = g;
      status.mixed_answer = mixed_answer[g];
      break;
    }
    if (flag[g] == kTooLarge) {
      status.too_large_group = g;
      break;
    }
  }
  return status;
}

#define FASTRL_INSTANTIATE(T)                                                             \
  template int64_t best_of_n<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, bool, \
                                int64_t*);                                              \
  template int64_t expected_best_of_k<T>(const T*, const int64_t*, int64_t, int64_t,       \
                                         const int64_t*, int64_t, bool, bool, double*);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(c10::Half)
FASTRL_INSTANTIATE(c10::BFloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cpu
}  // namespace fastrl
