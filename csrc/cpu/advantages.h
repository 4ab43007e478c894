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

// Dense ids in order of first appearance for `num_rows` keys of `row_bytes` bytes each
// (fixed-width strings or the bytes of integers). Writes ids[num_rows] and first_row[G];
// returns G, the number of distinct keys.
int64_t dense_ids(const uint8_t* rows, int64_t num_rows, int64_t row_bytes, int64_t* ids,
                  int64_t* first_row);

}  // namespace cpu
}  // namespace fastrl
