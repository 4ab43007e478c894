// CPU kernels of the log-prob family. Raw pointers only; csrc/torch/logprobs.cpp checks and dispatches.
#pragma once

#include <cstdint>

#include "fastrl/logprobs.h"

namespace fastrl {
namespace cpu {

// -1, or the first flat index i whose label is neither ignore_index nor in [0, vocab).
int64_t first_bad_label(const int64_t* labels, int64_t num_labels, int64_t vocab, int64_t ignore_index);

// Per row r of logits[num_rows, vocab] (element (r, j) at logits[r * row_stride + j]) with scaled
// logits z = x * inv_temperature and its num_labels labels labels[r * num_labels + k]:
// lse[r], logprobs[r * num_labels + k] = z[label] - lse (0 where label == ignore_index) and, when
// entropy != nullptr, entropy[r]. One streaming pass per row (see fastrl/logprobs.h). Returns
// first_bad_label(...) (a flat index into labels) without computing anything if it is >= 0.
template <typename scalar_t>
int64_t logprobs_forward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                         int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_temperature,
                         int64_t ignore_index, float* logprobs, float* entropy, float* lse);

// grad_logits[num_rows, vocab] (row r at grad_logits + r * grad_row_stride, unit stride) = d/dx of
// sum_{r,k} g_lp[r, k] logprobs[r, k] + sum_r g_ent[r] entropy[r] + g_lse[r] lse[r], from the
// forward's lse (and entropy, needed when g_ent is given). g_lp ([num_rows, num_labels]), g_ent,
// g_lse may each be nullptr (a zero gradient). Ignored labels get no log-prob gradient.
// grad_logits may be logits itself (grad_row_stride == row_stride): each row is read before it is
// overwritten. Returns first_bad_label(...) without writing anything if it is >= 0.
template <typename scalar_t>
int64_t logprobs_backward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                          int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_temperature,
                          int64_t ignore_index, const float* lse, const float* entropy,
                          const float* g_lp, const float* g_ent, const float* g_lse,
                          scalar_t* grad_logits, int64_t grad_row_stride);

}  // namespace cpu
}  // namespace fastrl
