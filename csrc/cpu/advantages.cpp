// CPU kernels of the group-advantage family.
//
// group_advantages: the statistics passes walk the samples in order and scatter into per-group
// accumulators (O(B) with G-sized state that stays in cache); they are sequential on purpose so a
// group's sums are added in sample order whatever the thread count. The per-sample advantage
// pass, the only one that scales with B on the write side, runs in parallel.
#include "cpu/advantages.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

namespace fastrl {
namespace cpu {

using advantages::GroupAccum;

template <typename scalar_t>
int64_t group_advantages(const scalar_t* scores, const int64_t* group_ids, const double* weights,
                         int64_t num_samples, int64_t num_groups, const advantages::Params& params,
                         float* adv, const advantages::StatsOut& stats) {
  std::vector<GroupAccum> acc(static_cast<size_t>(num_groups), advantages::accum_empty());

  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t g = group_ids[i];
    if (g < 0 || g >= num_groups) return i;
    const double x = static_cast<double>(scores[i]);
    if (!advantages::is_member(x, params)) continue;
    advantages::accum_first_pass(acc[g], x, weights ? weights[i] : 1.0);
  }
  std::vector<double> mean(static_cast<size_t>(num_groups));
  for (int64_t g = 0; g < num_groups; ++g) mean[g] = advantages::group_mean(acc[g]);
  for (int64_t i = 0; i < num_samples; ++i) {
    const double x = static_cast<double>(scores[i]);
    if (!advantages::is_member(x, params)) continue;
    const int64_t g = group_ids[i];
    advantages::accum_second_pass(acc[g], x, mean[g]);
  }

  const double batch_var = params.scale == advantages::Scale::kBatchStd
                               ? advantages::batch_variance(acc.data(), num_groups, params.unbiased)
                               : 0.0;

  at::parallel_for(0, num_samples, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double x = static_cast<double>(scores[i]);
      adv[i] = advantages::advantage(x, acc[group_ids[i]], batch_var, params);
    }
  });
  for (int64_t g = 0; g < num_groups; ++g) advantages::write_stats(stats, g, acc[g], params.unbiased);
  return -1;
}

#define FASTRL_INSTANTIATE(T)                                                                    \
  template int64_t group_advantages<T>(const T*, const int64_t*, const double*, int64_t, int64_t, \
                                       const advantages::Params&, float*, const advantages::StatsOut&);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(c10::Half)
FASTRL_INSTANTIATE(c10::BFloat16)
#undef FASTRL_INSTANTIATE

namespace {

// 64-bit FNV-1a over 8-byte words (then the tail bytes), finished with a murmur-style mix so the
// low bits used by the power-of-two table are well spread.
uint64_t hash_row(const uint8_t* p, int64_t n) {
  uint64_t h = 1469598103934665603ull;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    uint64_t word;
    std::memcpy(&word, p + k, 8);
    h = (h ^ word) * 1099511628211ull;
  }
  for (; k < n; ++k) h = (h ^ p[k]) * 1099511628211ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

}  // namespace

int64_t dense_ids(const uint8_t* rows, int64_t num_rows, int64_t row_bytes, int64_t* ids,
                  int64_t* first_row) {
  // Open addressing, linear probing; slots hold the first row of a key (or -1), load <= 0.5.
  int64_t capacity = 16;
  while (capacity < 2 * num_rows) capacity <<= 1;
  std::vector<int64_t> slot_row(static_cast<size_t>(capacity), -1);
  std::vector<int64_t> slot_id(static_cast<size_t>(capacity), -1);
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  int64_t num_keys = 0;
  for (int64_t r = 0; r < num_rows; ++r) {
    const uint8_t* key = rows + r * row_bytes;
    uint64_t s = hash_row(key, row_bytes) & mask;
    while (true) {
      const int64_t other = slot_row[s];
      if (other < 0) {
        slot_row[s] = r;
        slot_id[s] = num_keys;
        first_row[num_keys] = r;
        ids[r] = num_keys++;
        break;
      }
      if (std::memcmp(rows + other * row_bytes, key, static_cast<size_t>(row_bytes)) == 0) {
        ids[r] = slot_id[s];
        break;
      }
      s = (s + 1) & mask;
    }
  }
  return num_keys;
}

}  // namespace cpu
}  // namespace fastrl
