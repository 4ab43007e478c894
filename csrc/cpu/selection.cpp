// CPU kernels of the best-of-N / selection family.
//
// best_of_n: the samples are split into T contiguous chunks, each walked once in index order into
// its own table of per-group top-k lists; then, in parallel over groups, the T lists of each group
// are merged into the first. No sort, no per-group member lists. A list entry is one unsigned
// integer packing the score's order key and the sample index (the order of fastrl/selection.h:
// higher score, then lower index), so an offer is a few compares and selects, no branch. The order
// is total, so the result depends neither on T nor on the thread count, bitwise.
// T = the thread count, fewer for small batches (a chunk is at least kMinChunk samples) and when
// the tables would pass kTableBudget bytes (T * G * cap * 8 or 16 bytes; cap = k rounded up to
// 1, 2, 4, 8 or 16). Cost: O(B cap) register work, one list touched per sample, O(T G cap) merge.
//
// expected_best_of_k: a counting sort gathers each group's values (two sequential O(B) passes),
// then the groups, in parallel, are sorted best first and summed with the order-statistic weights
// of fastrl/selection.h, in rank order: bitwise the same whatever the thread count.
//
// all_pairs: the same counting sort; then, in parallel over groups, each group counts its pairs
// (O(n_g^2)), a prefix sum over groups places them, and each group writes its pairs in order.
//
// maj_at_k: the same counting sort gathers each group's (answer, correct) pairs; then, in parallel
// over groups, a sort by answer gives the answer classes and one dynamic program over vote counts
// (fastrl/selection.h maj_vote_dp) gives every k of the list at once. Sequential within a group:
// thread-count independent, and bitwise the CUDA kernel.
#include "cpu/selection.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
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

}  // namespace

namespace {

// best_of_n's list entries: the packed keys of fastrl/selection.h (64 bits for 16/32-bit floats
// and B <= 2^32, else 128 bits).
template <typename scalar_t>
constexpr bool kNarrowScore = sizeof(scalar_t) <= 4;

using selection::member_index;
using selection::member_key;

// Offers `x` to a list of Cap keys, best first, without a branch: every slot becomes the max of
// itself and the right candidate (x, or its left neighbour once x has passed it). Loads first so
// the slots stay in registers. On random order this beats an early-reject insertion (which
// mispredicts on about half the members of a group of 16): 65,536 shuffled samples in groups of
// 16, 2 cores, k = 4: 0.18 ms against 0.48-0.53 ms.
template <int Cap, typename Key>
inline void offer_fixed(Key* list, Key x) {
  Key v[Cap];
  for (int j = 0; j < Cap; ++j) v[j] = list[j];
  for (int j = Cap - 1; j > 0; --j) list[j] = v[j] > x ? v[j] : (v[j - 1] > x ? x : v[j - 1]);
  list[0] = v[0] > x ? v[0] : x;
}

// Lists longer than 16: reject at the last slot, else an insertion shift.
template <typename Key>
inline void offer_long(Key* list, int64_t cap, Key x) {
  if (x <= list[cap - 1]) return;
  int64_t p = cap - 1;
  for (; p > 0 && x > list[p - 1]; --p) list[p] = list[p - 1];
  list[p] = x;
}

// The samples are split into T contiguous chunks, each walked once in index order into its own
// table of per-group lists; then, in parallel over groups, the T lists of a group are merged into
// the first. The order is total, so the result depends neither on T nor on the thread count.
template <int Cap, typename Key, typename scalar_t>
int64_t best_of_n_tables(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                         int64_t num_groups, int64_t k, int64_t cap, bool largest, int64_t* out) {
  auto offer = [cap](Key* list, Key x) {
    if constexpr (Cap > 0) offer_fixed<Cap>(list, x);
    else offer_long(list, cap, x);
  };
  const int64_t slots = num_groups * cap;
  const int64_t by_size = std::max<int64_t>(1, num_samples / kMinChunk);
  const int64_t by_memory = std::max<int64_t>(
      1, kTableBudget / std::max<int64_t>(1, slots * static_cast<int64_t>(sizeof(Key))));
  const int64_t tables = std::min<int64_t>({at::get_num_threads(), by_size, by_memory});
  std::vector<Key> lists(static_cast<size_t>(tables * slots), Key{0});
  std::vector<int64_t> first_bad(static_cast<size_t>(tables), -1);
  at::parallel_for(0, tables, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      Key* table = lists.data() + t * slots;
      const int64_t end = num_samples * (t + 1) / tables;
      for (int64_t i = num_samples * t / tables; i < end; ++i) {
        const int64_t g = group_ids[i];
        if (g < 0 || g >= num_groups) {
          first_bad[t] = i;
          break;
        }
        const scalar_t x = scores[i];
        if (std::isnan(static_cast<double>(x))) continue;  // NaN: never selected
        offer(table + g * cap, member_key<Key>(x, i, largest));
      }
    }
  });
  for (int64_t t = 0; t < tables; ++t) {
    if (first_bad[t] >= 0) return first_bad[t];
  }
  at::parallel_for(0, num_groups, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      Key* list = lists.data() + g * cap;
      for (int64_t t = 1; t < tables; ++t) {
        const Key* other = lists.data() + t * slots + g * cap;
        for (int64_t j = 0; j < cap && other[j] != 0; ++j) offer(list, other[j]);
      }
      for (int64_t j = 0; j < k; ++j) out[g * k + j] = member_index(list[j]);
    }
  });
  return -1;
}

template <typename Key, typename scalar_t>
int64_t best_of_n_keyed(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                        int64_t num_groups, int64_t k, bool largest, int64_t* out) {
  // k rounds up to the next fixed list length (a list may hold more than k; its first k are the
  // top k)
  auto run = [&](auto cap_tag, int64_t cap) {
    return best_of_n_tables<decltype(cap_tag)::value, Key>(scores, group_ids, num_samples,
                                                           num_groups, k, cap, largest, out);
  };
  if (k == 1) return run(std::integral_constant<int, 1>{}, 1);
  if (k == 2) return run(std::integral_constant<int, 2>{}, 2);
  if (k <= 4) return run(std::integral_constant<int, 4>{}, 4);
  if (k <= 8) return run(std::integral_constant<int, 8>{}, 8);
  if (k <= 16) return run(std::integral_constant<int, 16>{}, 16);
  return run(std::integral_constant<int, 0>{}, k);
}

}  // namespace

template <typename scalar_t>
int64_t best_of_n(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                  int64_t num_groups, int64_t k, bool largest, int64_t* out) {
  if constexpr (kNarrowScore<scalar_t>) {
    if (num_samples <= (int64_t{1} << 32)) {
      return best_of_n_keyed<uint64_t>(scores, group_ids, num_samples, num_groups, k, largest, out);
    }
  }
  return best_of_n_keyed<unsigned __int128>(scores, group_ids, num_samples, num_groups, k, largest,
                                            out);
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

template <typename scalar_t>
int64_t all_pairs(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                  int64_t num_groups, double margin, int64_t max_pairs, int64_t* chosen,
                  int64_t* rejected) {
  std::fill(chosen, chosen + max_pairs, -1);
  std::fill(rejected, rejected + max_pairs, -1);
  std::vector<int64_t> start, order;
  const int64_t bad = group_by(group_ids, num_samples, num_groups, start, order);
  if (bad >= 0) return bad;
  // count per group, then an exclusive prefix over groups gives each group's first slot
  std::vector<int64_t> offset(static_cast<size_t>(num_groups) + 1, 0);
  at::parallel_for(0, num_groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      offset[g + 1] = selection::group_pairs(order.data() + start[g], start[g + 1] - start[g],
                                             scores, margin, 0, 0, nullptr, nullptr);
    }
  });
  for (int64_t g = 0; g < num_groups; ++g) offset[g + 1] += offset[g];
  at::parallel_for(0, num_groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end && offset[g] < max_pairs; ++g) {
      selection::group_pairs(order.data() + start[g], start[g + 1] - start[g], scores, margin,
                             offset[g], max_pairs, chosen, rejected);
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
    std::vector<std::pair<int64_t, bool>> votes;
    std::vector<int64_t> classes;
    std::vector<double> num, den, d1, d2, chat;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = start[g + 1] - start[g];
      double* row = out + g * num_k;
      std::fill(row, row + num_k, NAN);
      const int64_t kmax = std::min(k_max, n);
      if (kmax == 0) continue;
      if (kmax > selection::kMaxMajK) {
        flag[g] = kTooLarge;
        continue;
      }
      votes.clear();
      for (int64_t p = start[g]; p < start[g + 1]; ++p) {
        votes.emplace_back(answer_ids[order[p]], correct[order[p]]);
      }
      std::sort(votes.begin(), votes.end());  // by answer id: classes in a fixed order
      classes.clear();
      int64_t size = 0;
      for (size_t p = 0; p < votes.size(); ++p) {
        ++size;
        if (p + 1 < votes.size() && votes[p + 1].first == votes[p].first) {
          if (votes[p + 1].second != votes[p].second) {
            flag[g] = kMixed;
            mixed_answer[g] = votes[p].first;
            break;
          }
          continue;
        }
        classes.push_back(selection::maj_class(size, votes[p].second));
        size = 0;
      }
      if (flag[g] != kOk) continue;
      const int64_t A = static_cast<int64_t>(classes.size());
      const size_t states = static_cast<size_t>((kmax + 1) * (std::min(A, kmax) + 1));
      chat.resize(static_cast<size_t>(A * (kmax + 1)));
      d1.resize(states);
      d2.resize(states);
      num.resize(static_cast<size_t>(kmax + 1));
      den.resize(static_cast<size_t>(kmax + 1));
      selection::maj_vote_dp(classes.data(), A, n, kmax, chat.data(), d1.data(), d2.data(),
                             num.data(), den.data());
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
                                         const int64_t*, int64_t, bool, bool, double*);    \
  template int64_t all_pairs<T>(const T*, const int64_t*, int64_t, int64_t, double, int64_t, \
                                int64_t*, int64_t*);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(c10::Half)
FASTRL_INSTANTIATE(c10::BFloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cpu
}  // namespace fastrl
