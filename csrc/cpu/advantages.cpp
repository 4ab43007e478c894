// CPU kernels of the group-advantage family.
//
// group_advantages mirrors the CUDA pipeline: a stable counting sort of the samples by group (CSR,
// members in increasing sample index), then every group on its own — pass 1 and pass 2 of
// fastrl/advantages.h over its members in order, its statistics, its members' advantages. The
// groups run in parallel, but each group's sums are added in member order by one thread, so the
// results are bitwise the same whatever the thread count (and equal to the CUDA kernel's).
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
  // Counting sort: offsets[g] .. offsets[g + 1] are group g's members in the sorted arrays.
  std::vector<int64_t> offsets(static_cast<size_t>(num_groups) + 1, 0);
  for (int64_t i = 0; i < num_samples; ++i) {
    const int64_t g = group_ids[i];
    if (g < 0 || g >= num_groups) return i;
    ++offsets[g + 1];
  }
  for (int64_t g = 0; g < num_groups; ++g) offsets[g + 1] += offsets[g];
  std::vector<int64_t> member(static_cast<size_t>(num_samples));
  std::vector<double> value(static_cast<size_t>(num_samples));
  std::vector<double> weight(weights ? static_cast<size_t>(num_samples) : 0);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < num_samples; ++i) {
      const int64_t k = cursor[group_ids[i]]++;
      member[k] = i;
      value[k] = static_cast<double>(scores[i]);
      if (weights) weight[k] = weights[i];
    }
  }

  const bool batch_std = params.scale == advantages::Scale::kBatchStd;
  std::vector<GroupAccum> acc(batch_std ? static_cast<size_t>(num_groups) : 0);
  at::parallel_for(0, num_groups, 256, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      const int64_t begin = offsets[g], end = offsets[g + 1];
      GroupAccum a = advantages::accum_empty();
      for (int64_t k = begin; k < end; ++k) {
        if (advantages::is_member(value[k], params))
          advantages::accum_first_pass(a, value[k], weights ? weight[k] : 1.0);
      }
      const double mean = advantages::group_mean(a);
      for (int64_t k = begin; k < end; ++k) {
        if (advantages::is_member(value[k], params)) advantages::accum_second_pass(a, value[k], mean);
      }
      advantages::write_stats(stats, g, a, params.unbiased);
      if (batch_std) {
        acc[g] = a;
        continue;
      }
      for (int64_t k = begin; k < end; ++k) adv[member[k]] = advantages::advantage(value[k], a, 0.0, params);
    }
  });
  if (!batch_std) return -1;

  const double batch_var = advantages::batch_variance(acc.data(), num_groups, params.unbiased);
  at::parallel_for(0, num_samples, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      adv[i] = advantages::advantage(static_cast<double>(scores[i]), acc[group_ids[i]], batch_var, params);
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
