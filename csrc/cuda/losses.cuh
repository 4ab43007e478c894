// CUDA kernels of the fused policy-loss family: torch-free launch functions (raw device pointers,
// sizes, a stream). csrc/torch/losses.cpp checks and dispatches.
//
// The forward is one launch: one block per row, then the last block to finish runs the finish.
// The row sums some kinds need (sequence ratio, GMPO means) and the row's statistics (the forward
// also writes each token's derivatives; the backward scales them) are cub block reductions over a
// fixed thread-to-token assignment (each thread walks tokens tid, tid + kLossBlock, ...); the
// finish (the loss and the metrics) is one block's reduction over the rows in the same fixed
// assignment, whichever block runs it. So results are bitwise reproducible run to run: no
// floating-point atomics (one integer ticket counter), no host sync. They equal the CPU kernel's
// up to fp64 summation order. The backward is one launch of one block per row.
//
// A device-side check cannot raise without a host sync: a nonzero mask value counts as valid and
// cu_seqlens is trusted (a decreasing pair is an empty row). The CPU op raises instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastrl/losses.h"

namespace fastrl {
namespace cuda {

constexpr int kLossBlock = 256;

// Token inputs, each [num_tokens] on the device (padded [num_rows, row_len] when cu_seqlens is
// nullptr, else packed rows cu_seqlens[num_rows + 1]); ref, entropy, is_w may be nullptr; adv is
// [num_rows] when adv_per_row.
template <typename T>
struct LossPtrs {
  const T* logp;
  const T* old_logp;
  const T* adv;
  const T* ref;
  const T* entropy;
  const T* is_w;
  bool adv_per_row;
};

// The forward (see cpu/losses.h policy_loss_rows and policy_loss_finish), one kernel: stats
// [num_rows, losses::kNumStats] fp64 (the RowStat columns, kWeight / kPolicyDiv filled by the
// finish); dpol, daux (nullptr: no KL term): each token's derivatives, [num_tokens] in A (float for
// float/__half/__nv_bfloat16, double for double; 0 at masked tokens); the loss (float64 when
// loss_double, else float32) and metrics[losses::kNumMetrics]. counts: nullptr or [3] on the
// device. done: one unsigned of device memory, the blocks' ticket counter (zeroed here by a
// 4-byte cudaMemsetAsync before the launch). Runs for num_rows == 0 too (a zero loss and
// metrics). T: float, double, __half, __nv_bfloat16; M: bool, uint8_t, int32_t, int64_t, float,
// double.
template <typename T, typename M, typename A>
cudaError_t launch_policy_loss(LossPtrs<T> in, const M* mask, const int64_t* cu_seqlens, int64_t num_rows,
                               int64_t row_len, const losses::Params& p, const losses::FinishParams& f,
                               const double* counts, double* stats, A* dpol, A* daux, void* loss, bool loss_double,
                               float* metrics, unsigned* done, cudaStream_t stream);

// The backward (see cpu/losses.h policy_loss_rows_grad), one block per row, g = *grad (a device
// float64 when grad_double, else float32) * scale: grad_logp, and grad_entropy unless nullptr,
// [num_tokens] in A (float or double).
template <typename M, typename A>
cudaError_t launch_policy_loss_rows_grad(const M* mask, const int64_t* cu_seqlens, int64_t num_rows, int64_t row_len,
                                         const void* grad, bool grad_double, double scale, const double* stats,
                                         const A* dpol, const A* daux, double entropy_coef, A* grad_logp,
                                         A* grad_entropy, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrl
