// CUDA kernels of the best-of-N / selection family: torch-free launch functions (raw device
// pointers, sizes, a caller-allocated workspace, a stream). csrc/torch/selection.cpp checks and
// dispatches.
//
// Same result as fastrl::cpu::best_of_n, bitwise (the top-k order of fastrl/selection.h is total,
// so it does not depend on the order members are visited in). No floating-point atomics, no host
// synchronization. One difference, because a device-side check cannot raise without a host sync:
// a sample whose group id lies outside [0, num_groups) is ignored, where the CPU op raises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "fastrl/selection.h"

namespace fastrl {
namespace cuda {

// Largest num_groups the CUDA selection ops take (their group-id sorts use 32-bit keys).
constexpr int64_t kMaxSelectionGroups = 2147483646;

// Whether launch_best_of_n takes its two-cascade path: scores of score_bytes bytes (8: fp64) or a
// batch past 2^32 samples, whose packed keys do not fit the 64 bits of one atomic.
constexpr bool best_of_n_two_pass(size_t score_bytes, int64_t num_samples) {
  return score_bytes > 4 || num_samples > (int64_t{1} << 32);
}

// Bytes of device workspace launch_best_of_n needs for scores of score_bytes bytes (call with the
// launch's device current): 0 on the packed-key path, 8 * num_groups * k (plus alignment slack)
// on the two-cascade path, and 0 for invalid sizes (the launch then returns that error).
size_t best_of_n_workspace_bytes(int64_t num_samples, int64_t num_groups, int64_t k,
                                 size_t score_bytes);

// scores[num_samples] (float, double, __half, __nv_bfloat16), group_ids[num_samples] int64 in any
// order. Writes out[num_groups * k] (row g: group g's top-k sample indices, best first, -1
// padding). Returns cudaErrorInvalidValue for bad sizes or a short workspace, else the first
// launch error.
//
// Pipeline, no sort: out is zeroed, then
//  - float/half/bf16 scores (B <= 2^32): one thread per sample offers its packed key
//    (fastrl/selection.h member_key: the order key of the score as fp32, then ~index) to its
//    group's k slots of out with the atomic-max cascade (selection::cascade_offer: at most k 64-bit
//    atomicMax per sample, contended only within a group);
//  - fp64 scores (or more than 2^32 samples), whose packed keys would need 96 bits: two such
//    passes, score keys into a cut of k slots per group in the workspace, then each sample that
//    ranks within its group's cut offers ~index to the slots where its score ties
//    (selection::tie_slots), so equal scores are ordered by index;
// then one pass decodes the keys to indices in place. The slots end as the group's sorted top k
// whatever the order of the atomics, so the result is deterministic.
template <typename T>
cudaError_t launch_best_of_n(const T* scores, const int64_t* group_ids, int64_t num_samples,
                             int64_t num_groups, int64_t k, bool largest, int64_t* out,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Bytes of device workspace launch_expected_best_of_k needs (call with the launch's device
// current); 0 if the size query failed (the launch then returns that error).
size_t expected_best_of_k_workspace_bytes(int64_t num_samples, int64_t num_groups);

// best@k (largest) or worst@k of every group for each k of ks[num_k] (a host array, all >= 1),
// as fastrl::cpu::expected_best_of_k: writes out[num_groups * num_k] fp64 (NaN for a group with a
// NaN score, an empty group, or k > n without replacement). Samples with an out-of-range group id
// are ignored. Pipeline: scores to fp64, a cub radix sort of (value, group key) by value, a
// stable one by group key, then one thread per group (binary search for its segment) sums the
// order-statistic weights of fastrl/selection.h best first: bitwise the CPU result without
// replacement. Extra memory: the workspace, about 24 * num_samples bytes plus cub's storage.
template <typename T>
cudaError_t launch_expected_best_of_k(const T* scores, const int64_t* group_ids,
                                      int64_t num_samples, int64_t num_groups, const int64_t* ks,
                                      int64_t num_k, bool replacement, bool largest, double* out,
                                      void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream);

// Bytes of device workspace launch_all_pairs needs (call with the launch's device current); 0 if
// the size query failed (the launch then returns that error).
size_t all_pairs_workspace_bytes(int64_t num_samples, int64_t num_groups);

// The pairs of fastrl::cpu::all_pairs (same pairs, same order, -1 after the last one or past
// max_pairs) into chosen/rejected[max_pairs], with no host sync; samples with an out-of-range
// group id are ignored. Pipeline: scores to fp64 and a radix sort of the group ids, one thread
// per group counts its pairs (O(n_g^2)), a cub exclusive scan places them, one thread per group
// writes its own. Extra memory: the workspace, about 32 * num_samples +
// 16 * num_groups bytes plus cub's storage.
template <typename T>
cudaError_t launch_all_pairs(const T* scores, const int64_t* group_ids, int64_t num_samples,
                             int64_t num_groups, double margin, int64_t max_pairs, int64_t* chosen,
                             int64_t* rejected, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// Bytes of device workspace launch_maj_at_k needs for the largest k k_max (call with the launch's
// device current); 0 if the size query failed (the launch then returns that error).
size_t maj_at_k_workspace_bytes(int64_t num_samples, int64_t num_groups, int64_t k_max);

// maj@k of every group for each k of ks[num_k] (a host array, all >= 1), as fastrl::cpu::maj_at_k
// and bitwise equal to it: writes out[num_groups * num_k] fp64, NaN where k > n. A device kernel
// cannot raise without a host sync, so where the CPU op raises this writes a NaN row instead: a
// group with an answer id both correct and not, or one where min(max k, n) > kMaxMajK; samples
// with an out-of-range group id are ignored. Pipeline: a cub radix sort of the samples by answer
// id, a stable one by group id (each group contiguous, its answers grouped in id order, as the CPU
// kernel's classes), then one warp per group: lane 0 collects the answer classes, the lanes share
// the states of each step of fastrl/selection.h's DP (double-buffered), then one thread per
// (group, k) writes num[k] / den[k]. Extra memory: the workspace,
// 8 (kc + 1) (5 num_samples + 6 num_groups) + 40 num_samples + 16 num_groups bytes plus cub's
// storage, kc = min(max k, num_samples, kMaxMajK).
cudaError_t launch_maj_at_k(const int64_t* answer_ids, const bool* correct,
                            const int64_t* group_ids, int64_t num_samples, int64_t num_groups,
                            const int64_t* ks, int64_t num_k, double* out, void* workspace,
                            size_t workspace_bytes, cudaStream_t stream);

#define FASTRL_DECLARE_LAUNCH(T)                                                                \
  extern template cudaError_t launch_best_of_n<T>(const T*, const int64_t*, int64_t, int64_t,  \
                                                  int64_t, bool, int64_t*, void*, size_t,      \
                                                  cudaStream_t);                               \
  extern template cudaError_t launch_expected_best_of_k<T>(                                    \
      const T*, const int64_t*, int64_t, int64_t, const int64_t*, int64_t, bool, bool, double*, \
      void*, size_t, cudaStream_t);                                                           \
  extern template cudaError_t launch_all_pairs<T>(const T*, const int64_t*, int64_t, int64_t,  \
                                                  double, int64_t, int64_t*, int64_t*, void*,  \
                                                  size_t, cudaStream_t);
FASTRL_DECLARE_LAUNCH(float)
FASTRL_DECLARE_LAUNCH(double)
FASTRL_DECLARE_LAUNCH(__half)
FASTRL_DECLARE_LAUNCH(__nv_bfloat16)
#undef FASTRL_DECLARE_LAUNCH

}  // namespace cuda
}  // namespace fastrl
