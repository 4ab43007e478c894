// CUDA kernels of the log-prob family: torch-free launch functions (raw device pointers, sizes,
// a stream). csrc/torch/logprobs.cpp checks and dispatches.
//
// One block per row: each thread folds its elements (16-byte vectorized loads where the row is
// 16-byte aligned) into an online softmax state (fastrl/logprobs.h), and the block merges the
// thread states in a fixed tree order. A row's result therefore depends only on that row: bitwise
// reproducible and batch invariant; equal to the CPU op up to fp32 rounding (different split of the
// row, expf vs the CPU polynomial). The logits are read once forward, once backward (which writes
// the gradient). No floating-point atomics, no host synchronization, no workspace.
//
// A label outside [0, vocab) other than ignore_index cannot raise without a host sync: its
// log-prob is NaN and its row gets no log-prob gradient (the CPU op raises).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastrl/logprobs.h"

namespace fastrl {
namespace cuda {

// logits: row r at logits + r * row_stride, vocab elements, unit stride. labels
// int64[num_rows, num_labels]. Writes logprobs[num_rows, num_labels], lse[num_rows] and, unless
// entropy == nullptr, entropy[num_rows].
template <typename T>
cudaError_t launch_logprobs_forward(const T* logits, int64_t row_stride, const int64_t* labels,
                                    int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_temperature,
                                    int64_t ignore_index, float* logprobs, float* entropy, float* lse,
                                    cudaStream_t stream);

// grad_logits[num_rows, vocab] (row r at grad_logits + r * grad_row_stride) from the forward's lse
// (and entropy, read when g_ent is given); g_lp fp32 [num_rows, num_labels], g_ent, g_lse fp32
// [num_rows], each or nullptr (zero). See fastrl::logprobs::grad_z_labels. grad_logits may be logits
// itself (in place): each element is read and then written by the same thread. The one-hot terms
// cost num_labels compares per element (top-K labels: keep K small).
template <typename T>
cudaError_t launch_logprobs_backward(const T* logits, int64_t row_stride, const int64_t* labels,
                                     int64_t num_rows, int64_t num_labels, int64_t vocab,
                                     float inv_temperature, int64_t ignore_index, const float* lse,
                                     const float* entropy, const float* g_lp, const float* g_ent,
                                     const float* g_lse, T* grad_logits, int64_t grad_row_stride,
                                     cudaStream_t stream);

#define FASTRL_DECLARE_LAUNCH(T)                                                                 \
  extern template cudaError_t launch_logprobs_forward<T>(const T*, int64_t, const int64_t*,     \
                                                         int64_t, int64_t, int64_t, float,      \
                                                         int64_t, float*, float*, float*,       \
                                                         cudaStream_t);                         \
  extern template cudaError_t launch_logprobs_backward<T>(                                      \
      const T*, int64_t, const int64_t*, int64_t, int64_t, int64_t, float, int64_t, const float*, \
      const float*, const float*, const float*, const float*, T*, int64_t, cudaStream_t);
FASTRL_DECLARE_LAUNCH(float)
FASTRL_DECLARE_LAUNCH(double)
FASTRL_DECLARE_LAUNCH(__half)
FASTRL_DECLARE_LAUNCH(__nv_bfloat16)
#undef FASTRL_DECLARE_LAUNCH

}  // namespace cuda
}  // namespace fastrl
