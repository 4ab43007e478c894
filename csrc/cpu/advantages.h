// CPU kernels of the group-advantage family. Raw pointers only; csrc/torch/ checks and dispatches.
#pragma once

#include <cstdint>

#include "fastrl/advantages.h"

namespace fastrl {
namespace cpu {

// Statistics of every group, then the advantage of every sample (see fastrl/advantages.h).
// Returns -1, or the index of the first sample whose group id is outside [0, num_groups).
template <typename scalar_t>
int64_t group_advantages(const scalar_t* scores, const int64_t* group_ids, const double* weights,
                         int64_t num_samples, int64_t num_groups, const advantages::Params& params,
                         float* adv, const advantages::StatsOut& stats);

// A key of dense_ids: `size` bytes at `data` (a fixed-width row, an integer, a UTF-8 string).
struct KeyView {
  const uint8_t* data;
  int64_t size;
};

// Dense ids in order of first appearance of `num_keys` byte-string keys, by hashing (no sort).
// Writes ids[num_keys] and first_index[G]; returns G, the number of distinct keys.
int64_t dense_ids(const KeyView* keys, int64_t num_keys, int64_t* ids, int64_t* first_index);

}  // namespace cpu
}  // namespace fastrl
