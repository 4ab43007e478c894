// CPU kernels of the best-of-N / selection family. Raw pointers only; csrc/torch/ checks and
// dispatches.
#pragma once

#include <cstdint>

#include "fastrl/selection.h"

namespace fastrl {
namespace cpu {

// The top k samples of every group (fastrl/selection.h order), one pass over the samples.
// Writes out[num_groups * k]: row g holds group g's sample indices best first, -1 past its number
// of non-NaN members. Returns -1, or the index of the first sample whose group id lies outside
// [0, num_groups).
template <typename scalar_t>
int64_t best_of_n(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                  int64_t num_groups, int64_t k, bool largest, int64_t* out);

// best@k (largest) or worst@k of every group for each k of ks[num_k] (fastrl/selection.h
// expected_best): out[num_groups * num_k] fp64, NaN for a group holding a NaN score.
// Returns -1, or the index of the first sample whose group id lies outside [0, num_groups).
template <typename scalar_t>
int64_t expected_best_of_k(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                           int64_t num_groups, const int64_t* ks, int64_t num_k, bool replacement,
                           bool largest, double* out);

}  // namespace cpu
}  // namespace fastrl
