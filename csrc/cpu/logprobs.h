// CPU kernels of the log-prob family. Raw pointers only; csrc/torch/logprobs.cpp checks and dispatches.
#pragma once

#include <cstdint>

#include "fastrl/logprobs.h"

namespace fastrl {
namespace cpu {

// -1, or the first row r whose label is neither ignore_index nor in [0, vocab).
int64_t first_bad_label(const int64_t* labels, int64_t num_rows, int64_t vocab, int64_t ignore_index);

// Per row r of logits[num_rows, vocab] (element (r, j) at logits[r * row_stride + j]) with scaled
// logits z = x * inv_temperature: lse[r], logprobs[r] = z[label] - lse (0 where label ==
// ignore_index) and, when entropy != nullptr, entropy[r]. One streaming pass per row (see
// fastrl/logprobs.h). Returns first_bad_label(...) without computing anything if it is >= 0.
template <typename scalar_t>
int64_t logprobs_forward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                         int64_t num_rows, int64_t vocab, float inv_temperature,
                         int64_t ignore_index, float* logprobs, float* entropy, float* lse);

// grad_logits[num_rows, vocab] (contiguous) = d/dx of sum_r g_lp[r] logprobs[r] + g_ent[r]
// entropy[r] + g_lse[r] lse[r], from the forward's lse (and entropy, needed when g_ent is given).
// g_lp, g_ent, g_lse may each be nullptr (a zero gradient). Ignored rows get no log-prob gradient.
// Returns first_bad_label(...) without writing anything if it is >= 0.
template <typename scalar_t>
int64_t logprobs_backward(const scalar_t* logits, int64_t row_stride, const int64_t* labels,
                          int64_t num_rows, int64_t vocab, float inv_temperature,
                          int64_t ignore_index, const float* lse, const float* entropy,
                          const float* g_lp, const float* g_ent, const float* g_lse,
                          scalar_t* grad_logits);

}  // namespace cpu
}  // namespace fastrl
