// CPU kernel of token sampling. Raw pointers only; csrc/torch/sampling.cpp checks and dispatches.
#pragma once

#include <cstdint>

#include "fastrl/sampling.h"

namespace fastrl {
namespace cpu {

// Samples one token per row of logits[num_rows, vocab] (row r at logits + r * row_stride, unit
// stride) as defined in fastrl/sampling.h, with uniforms[r] in [0, 1) and the row's parameters
// from `params` (valid: the caller checks them). Writes tokens[r], logprobs[r] (processed
// distribution) and raw_logprobs[r] (temperature-scaled distribution). A row that cannot be
// sampled (a NaN or +inf scaled logit, or only -inf) gets token -1 and NaN log-probs; the return
// value is the first such row, or -1. Extra memory: per thread, 3 V floats of buffers.
template <typename scalar_t>
int64_t sample_tokens(const scalar_t* logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                      const double* uniforms, const sampling::ParamSource& params, int64_t* tokens,
                      float* logprobs, float* raw_logprobs);

}  // namespace cpu
}  // namespace fastrl
