// CUDA kernels of the token-level credit-assignment family: torch-free launch functions (raw
// device pointers, sizes, a stream). csrc/torch/credit.cpp checks and dispatches.
//
// Each row is one block-wide associative scan over the affine pairs of fastrl/credit.h (cub
// BlockScan, tiles of kScanTile tokens walked from the row's end, the running composite carried
// between tiles), so a 32k-token row is spread over 256 threads instead of walked by one. The scan
// re-associates the products: results equal the CPU kernels' up to rounding (relative error a few
// fp32 ulps times the row length's log, see tests), and are bitwise reproducible run to run (fixed
// block shape, no atomics, no host sync).
//
// Because a device-side check cannot raise without a host sync, the CUDA kernels do not validate
// values: a nonzero mask value counts as valid, and a packed row [cu_seqlens[b], cu_seqlens[b+1])
// is clamped to [0, num_tokens] (a decreasing pair is an empty row). The CPU op raises instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastrl/credit.h"

namespace fastrl {
namespace cuda {

// The accumulation (and output) type of an input type: float for float/__half/__nv_bfloat16.
template <typename T>
struct CreditAcc {
  using type = float;
};
template <>
struct CreditAcc<double> {
  using type = double;
};

constexpr int kScanTile = 1024;  // tokens per block-wide scan step

// rewards, values, mask: [num_tokens] (padded [num_rows, row_len] contiguous when cu_seqlens is
// nullptr, else packed rows given by cu_seqlens[num_rows + 1], int64, on the device).
// Writes adv and ret (credit.h GAE in credit::GaeMode `mode`, turn ends at dones[i] != 0, dones
// may be nullptr) at every position. row_moments (nullptr: not wanted; else [num_rows] on the
// device) receives each row's credit::Moments of adv over its valid tokens, for the fused
// whitening: each thread keeps fp64 moments of the positions it scans (each tile's items summarized
// in two passes, merged into the thread's running moments with Chan's formula, tile after tile),
// and a fixed-shape block reduction merges the threads' (deterministic, independent of the grid).
// Returns cudaErrorInvalidValue for bad sizes, else the launch error. No workspace.
template <typename T, typename M>
cudaError_t launch_gae(const T* rewards, const T* values, const M* mask, const bool* dones,
                       const int64_t* cu_seqlens, int64_t num_rows, int64_t row_len,
                       int64_t num_tokens, double gamma, double lam, credit::GaeMode mode,
                       double turn_gamma, double turn_lam, typename CreditAcc<T>::type* adv,
                       typename CreditAcc<T>::type* ret, credit::Moments* row_moments,
                       cudaStream_t stream);

// Discounted returns in credit::ReturnsMode `mode` with turn ends at dones[i] (nullptr: none)
// discounted by turn_gamma (credit::returns_turn_step), same layout and contract as launch_gae
// (row_moments: each row's moments of out over its valid tokens).
template <typename T, typename M>
cudaError_t launch_discounted_returns(const T* rewards, const M* mask, const bool* dones,
                                      const int64_t* cu_seqlens, int64_t num_rows,
                                      int64_t row_len, int64_t num_tokens, double gamma,
                                      credit::ReturnsMode mode, double turn_gamma,
                                      typename CreditAcc<T>::type* out,
                                      credit::Moments* row_moments, cudaStream_t stream);

// Masked statistics and whitening (verl's masked_mean / masked_var / masked_whiten), in three
// launches, no host sync, no fp64 copy of x:
//   launch_masked_moments  x[n] cut in fixed chunks of kMomentsChunk elements; one block
//                          summarizes a chunk (each thread two passes over kMomentsChunk / 256
//                          strided elements in registers, then a fixed-shape block merge)
//                          into chunks[c], c < masked_moments_num_chunks(n);
//   launch_merge_moments   merges parts[num_parts] (chunks, or a scan's row_moments) in a fixed
//                          order with one block: thread t merges a contiguous run of parts in
//                          order, then a fixed-shape block merge; writes *count, *mean, *m2 and,
//                          when coefs is not nullptr, credit::whiten_coefs(shift_mean, unbiased,
//                          eps) of the merged moments into *coefs (computed once, on the device);
//   launch_whiten          out[i] = credit::whiten_value(x[i], *coefs) (read on the device), times
//                          mask[i] when mask is not nullptr (REINFORCE++), rounded as the CPU's
//                          (cpu::affine_transform / masked_affine_transform).
// Every result is deterministic and independent of the grid size. A nonzero mask value counts as
// valid (not checked: that would need a host sync). out may be x (in place).
constexpr int64_t kMomentsChunk = 4096;

inline int64_t masked_moments_num_chunks(int64_t n) {
  return (n + kMomentsChunk - 1) / kMomentsChunk;
}

template <typename T, typename M>
cudaError_t launch_masked_moments(const T* x, const M* mask, int64_t n, credit::Moments* chunks,
                                  cudaStream_t stream);

cudaError_t launch_merge_moments(const credit::Moments* parts, int64_t num_parts, double* count,
                                 double* mean, double* m2, credit::WhitenCoefs* coefs,
                                 bool shift_mean, bool unbiased, double eps, cudaStream_t stream);

template <typename T, typename M>
cudaError_t launch_whiten(const T* x, const M* mask, int64_t n, const credit::WhitenCoefs* coefs,
                          T* out, cudaStream_t stream);

// PRIME implicit rewards (credit::implicit_reward; mask may be nullptr: every token valid), same
// layout and contract as launch_gae. step_ends == nullptr: per token, elementwise. Otherwise each
// step's rewards summed in fp64 in token order (one thread walks a step: bitwise the CPU kernel)
// at the step's last valid token, 0 elsewhere; see cpu::implicit_rewards for the step rules.
template <typename T, typename M>
cudaError_t launch_implicit_rewards(const T* logp, const T* ref, const M* mask,
                                    const bool* step_ends, const int64_t* cu_seqlens,
                                    int64_t num_rows, int64_t row_len, int64_t num_tokens,
                                    double beta, typename CreditAcc<T>::type* out,
                                    cudaStream_t stream);

// Elementwise KL estimator (credit::kl_value) of logp/ref [n]: inputs T, arithmetic A, output O
// (verl: A = CreditAcc<T>, O = T; OpenRLHF: A = O = float). Grid-stride, no workspace.
template <typename T, typename A, typename O>
cudaError_t launch_kl_penalty(const T* logp, const T* ref, int64_t n, credit::KlKind kind,
                              credit::KlConvention conv, O* out, cudaStream_t stream);

// grad_logp[i] = grad[i] * credit::kl_grad(logp[i], ref[i]) (in A, rounded to T).
template <typename T, typename A, typename O>
cudaError_t launch_kl_penalty_grad(const O* grad, const T* logp, const T* ref, int64_t n,
                                   credit::KlKind kind, credit::KlConvention conv, T* grad_logp,
                                   cudaStream_t stream);

// credit::token_reward per row, same layout and contract as launch_gae: one block per row finds
// the row's last valid token (block max-reduction), then writes the row. kl may be nullptr.
template <typename T, typename M>
cudaError_t launch_token_rewards(const T* scores, const M* mask, const T* kl,
                                 const int64_t* cu_seqlens, int64_t num_rows, int64_t row_len,
                                 int64_t num_tokens, double kl_coef,
                                 typename CreditAcc<T>::type* out, cudaStream_t stream);

// credit::segment_value per row (mask may be nullptr: every token valid), same layout and contract
// as launch_gae: one block per row, fp64 per-thread partial sums merged by a fixed-shape block
// reduction (deterministic; the summation order differs from the CPU's token order by rounding).
template <typename T, typename M>
cudaError_t launch_segment_reduce(const T* x, const M* mask, const int64_t* cu_seqlens,
                                  int64_t num_rows, int64_t row_len, int64_t num_tokens,
                                  credit::SegmentReduce op, typename CreditAcc<T>::type* out,
                                  cudaStream_t stream);

// grad_x[i] = grad[b] * credit::segment_grad(...) at valid tokens of row b, 0 at masked ones.
template <typename T, typename M>
cudaError_t launch_segment_reduce_grad(const typename CreditAcc<T>::type* grad, const T* x,
                                       const M* mask, const int64_t* cu_seqlens, int64_t num_rows,
                                       int64_t row_len, int64_t num_tokens,
                                       credit::SegmentReduce op, T* grad_x, cudaStream_t stream);

#define FASTRL_DECLARE_CREDIT(T, M)                                                            \
  extern template cudaError_t launch_gae<T, M>(                                               \
      const T*, const T*, const M*, const bool*, const int64_t*, int64_t, int64_t, int64_t,    \
      double, double, credit::GaeMode, double, double, CreditAcc<T>::type*,                    \
      CreditAcc<T>::type*, credit::Moments*, cudaStream_t);                                    \
  extern template cudaError_t launch_discounted_returns<T, M>(                                \
      const T*, const M*, const bool*, const int64_t*, int64_t, int64_t, int64_t, double,      \
      credit::ReturnsMode, double, CreditAcc<T>::type*, credit::Moments*, cudaStream_t);      \
  extern template cudaError_t launch_masked_moments<T, M>(const T*, const M*, int64_t,        \
                                                          credit::Moments*, cudaStream_t);    \
  extern template cudaError_t launch_whiten<T, M>(const T*, const M*, int64_t,                \
                                                  const credit::WhitenCoefs*, T*,             \
                                                  cudaStream_t);                              \
  extern template cudaError_t launch_implicit_rewards<T, M>(                                  \
      const T*, const T*, const M*, const bool*, const int64_t*, int64_t, int64_t, int64_t,    \
      double, CreditAcc<T>::type*, cudaStream_t);                                              \
  extern template cudaError_t launch_token_rewards<T, M>(                                     \
      const T*, const M*, const T*, const int64_t*, int64_t, int64_t, int64_t, double,         \
      CreditAcc<T>::type*, cudaStream_t);                                                      \
  extern template cudaError_t launch_segment_reduce<T, M>(                                    \
      const T*, const M*, const int64_t*, int64_t, int64_t, int64_t, credit::SegmentReduce,    \
      CreditAcc<T>::type*, cudaStream_t);                                                      \
  extern template cudaError_t launch_segment_reduce_grad<T, M>(                               \
      const CreditAcc<T>::type*, const T*, const M*, const int64_t*, int64_t, int64_t, int64_t, \
      credit::SegmentReduce, T*, cudaStream_t);
#define FASTRL_DECLARE_CREDIT_MASKS(T)  \
  FASTRL_DECLARE_CREDIT(T, bool)        \
  FASTRL_DECLARE_CREDIT(T, uint8_t)     \
  FASTRL_DECLARE_CREDIT(T, int32_t)     \
  FASTRL_DECLARE_CREDIT(T, int64_t)     \
  FASTRL_DECLARE_CREDIT(T, float)       \
  FASTRL_DECLARE_CREDIT(T, double)
FASTRL_DECLARE_CREDIT_MASKS(float)
FASTRL_DECLARE_CREDIT_MASKS(double)
FASTRL_DECLARE_CREDIT_MASKS(__half)
FASTRL_DECLARE_CREDIT_MASKS(__nv_bfloat16)
#undef FASTRL_DECLARE_CREDIT_MASKS
#undef FASTRL_DECLARE_CREDIT

#define FASTRL_DECLARE_KL(T, A, O)                                                             \
  extern template cudaError_t launch_kl_penalty<T, A, O>(const T*, const T*, int64_t,          \
                                                         credit::KlKind, credit::KlConvention, \
                                                         O*, cudaStream_t);                    \
  extern template cudaError_t launch_kl_penalty_grad<T, A, O>(                                 \
      const O*, const T*, const T*, int64_t, credit::KlKind, credit::KlConvention, T*,         \
      cudaStream_t);
FASTRL_DECLARE_KL(float, float, float)
FASTRL_DECLARE_KL(double, double, double)
FASTRL_DECLARE_KL(__half, float, __half)
FASTRL_DECLARE_KL(__nv_bfloat16, float, __nv_bfloat16)
FASTRL_DECLARE_KL(double, float, float)
FASTRL_DECLARE_KL(__half, float, float)
FASTRL_DECLARE_KL(__nv_bfloat16, float, float)
#undef FASTRL_DECLARE_KL

}  // namespace cuda
}  // namespace fastrl
