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
#include "cpu/selection.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <vector>

namespace fastrl {
namespace cpu {
namespace {

constexpr int64_t kMinChunk = 16384;
constexpr int64_t kTableBudget = int64_t{64} << 20;

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
  std::vector<int64_t> start(static_cast<size_t>(num_groups) + 1, 0);
  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t g = group_ids[i];
    if (g < 0 || g >= num_groups) return i;
    ++start[g + 1];
  }
  for (int64_t g = 0; g < num_groups; ++g) start[g + 1] += start[g];
  std::vector<double> vals(static_cast<size_t>(num_samples));
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < num_samples; ++i) vals[fill[group_ids[i]]++] = static_cast<double>(scores[i]);
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
        out[g * num_k + j] = selection::expected_best(v, n, ks[j], replacement);
      }
    }
  });
  return -1;
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
