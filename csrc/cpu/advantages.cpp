// CPU kernels of the group-advantage family.
//
// group_advantages: pass 1 and pass 2 of fastrl/advantages.h walk the samples in index order and
// accumulate into their group's accumulator, so every group's sums are added in sample order —
// the order the CUDA kernel uses too — and the results are bitwise the same whatever the thread
// count. These two passes are sequential (the per-group state, G x 64 bytes, stays in cache); the
// per-group coefficients and the per-sample advantages, the part that writes B outputs, run in
// parallel.
#include "cpu/advantages.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <vector>

namespace fastrl {
namespace cpu {

using advantages::Coefficients;
using advantages::GroupAccum;

template <typename scalar_t>
int64_t group_advantages(const scalar_t* scores, const int64_t* group_ids, const double* weights,
                         int64_t num_samples, int64_t num_groups, const advantages::Params& params,
                         float* adv, const advantages::StatsOut& stats) {
  const advantages::Params p = params;  // a local copy: stores to acc[] cannot alias it
  std::vector<GroupAccum> acc(static_cast<size_t>(num_groups), advantages::accum_empty());
  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t g = group_ids[i];
    if (g < 0 || g >= num_groups) return i;
    const double x = static_cast<double>(scores[i]);
    if (advantages::is_member(x, p)) advantages::accum_first_pass(acc[g], x, weights ? weights[i] : 1.0);
  }
  std::vector<double> mean(static_cast<size_t>(num_groups));
  for (int64_t g = 0; g < num_groups; ++g) mean[g] = advantages::group_mean(acc[g]);
  for (int64_t i = 0; i < num_samples; ++i) {
    const double x = static_cast<double>(scores[i]);
    const int64_t g = group_ids[i];
    if (advantages::is_member(x, p)) advantages::accum_second_pass(acc[g], x, mean[g]);
  }

  const double batch_var = p.scale == advantages::Scale::kBatchStd
                               ? advantages::batch_variance(acc.data(), num_groups, p.unbiased)
                               : 0.0;
  std::vector<Coefficients> coef(static_cast<size_t>(num_groups));
  at::parallel_for(0, num_groups, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      advantages::write_stats(stats, g, acc[g], p.unbiased);
      coef[g] = advantages::coefficients(acc[g], batch_var, p);
    }
  });
  at::parallel_for(0, num_samples, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      adv[i] = advantages::advantage(static_cast<double>(scores[i]), coef[group_ids[i]], p);
    }
  });
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
uint64_t hash_bytes(const uint8_t* p, int64_t n) {
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

int64_t dense_ids(const KeyView* keys, int64_t num_keys, int64_t* ids, int64_t* first_index) {
  // Open addressing, linear probing; a slot holds the first index of its key (or -1), load <= 0.5.
  int64_t capacity = 16;
  while (capacity < 2 * num_keys) capacity <<= 1;
  std::vector<int64_t> slot_first(static_cast<size_t>(capacity), -1);
  std::vector<int64_t> slot_id(static_cast<size_t>(capacity), -1);
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  int64_t num_distinct = 0;
  for (int64_t r = 0; r < num_keys; ++r) {
    const KeyView key = keys[r];
    uint64_t s = hash_bytes(key.data, key.size) & mask;
    while (true) {
      const int64_t other = slot_first[s];
      if (other < 0) {
        slot_first[s] = r;
        slot_id[s] = num_distinct;
        first_index[num_distinct] = r;
        ids[r] = num_distinct++;
        break;
      }
      if (keys[other].size == key.size &&
          std::memcmp(keys[other].data, key.data, static_cast<size_t>(key.size)) == 0) {
        ids[r] = slot_id[s];
        break;
      }
      s = (s + 1) & mask;
    }
  }
  return num_distinct;
}

}  // namespace cpu
}  // namespace fastrl
