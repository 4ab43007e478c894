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

// Every ordered pair (c, r) of a group with scores[c] - scores[r] > margin (fp64, margin >= 0;
// fastrl/selection.h group_pairs), ordered by group, then c, then r: the first max_pairs go to
// chosen/rejected[max_pairs], -1 fills the rest. Returns -1, or the index of the first sample
// whose group id lies outside [0, num_groups).
template <typename scalar_t>
int64_t all_pairs(const scalar_t* scores, const int64_t* group_ids, int64_t num_samples,
                  int64_t num_groups, double margin, int64_t max_pairs, int64_t* chosen,
                  int64_t* rejected);

// What maj_at_k found wrong (all -1: nothing).
struct MajStatus {
  int64_t bad_group_sample = -1;  // first sample whose group id lies outside [0, num_groups)
  int64_t mixed_group = -1;       // first group with an answer id both correct and not ...
  int64_t mixed_answer = 0;       // ... that answer id
  int64_t too_large_group = -1;   // first group where min(max k, n) > 1000 (beyond the DP's range)
};

// maj@k of every group for each k of ks[num_k] (all >= 1): the exact expected correctness of a
// majority vote (uniform tie-break) over a uniform k-subset drawn without replacement.
// correct[i] is sample i's answer's correctness (must agree within an answer id of a group).
// out[num_groups * num_k] fp64, NaN where k > n. On a bad input (MajStatus) out is partial.
MajStatus maj_at_k(const int64_t* answer_ids, const bool* correct, const int64_t* group_ids,
                   int64_t num_samples, int64_t num_groups, const int64_t* ks, int64_t num_k,
                   double* out);

}  // namespace cpu
}  // namespace fastrl
