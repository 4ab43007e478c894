// CUDA kernel of token sampling: a torch-free launch function (raw device pointers, sizes, a
// stream). csrc/torch/sampling.cpp checks and dispatches; the math is in fastrl/sampling.h.
//
// One block per row, no sort, no workspace: the max, radix selects of the top-k and top-p
// thresholds (a histogram pass over the row, the rest in shared memory), the kept and raw masses,
// then an inverse-CDF search in index order: 2 reads of the row for top-k (with top-p too when
// the top-k set fits in shared memory), 3 for top-p alone (cuda/sampling.cu). Histograms and sums
// are integers (warp-aggregated shared-memory integer atomics, order-independent), so the result
// is bitwise reproducible and batch invariant, and equal to the CPU op's given the same uniforms
// wherever expf rounds alike. No floating-point atomics, no host synchronization.
//
// A row that cannot be sampled (NaN / +inf scaled logit, only -inf) or whose per-row parameters
// are out of range gets token -1 and NaN log-probs (the CPU op raises instead).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastrl/sampling.h"

namespace fastrl {
namespace cuda {

// logits: row r at logits + r * row_stride, vocab (<= sampling::kMaxVocab) elements, unit stride.
// uniforms fp64 [num_rows]; writes tokens int64, logprobs and raw_logprobs fp32 [num_rows].
template <typename T>
cudaError_t launch_sample_tokens(const T* logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                                 const double* uniforms, const sampling::ParamSource& params, int64_t* tokens,
                                 float* logprobs, float* raw_logprobs, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastrl
