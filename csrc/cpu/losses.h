// CPU kernels of the fused policy-loss family (fastrl/losses.h). Raw pointers only; csrc/torch/
// checks and dispatches. Bad mask values are reported by returning an index, never by throwing.
#pragma once

#include <cstdint>

#include "cpu/credit.h"  // cpu::Rows: the padded / packed row layout
#include "fastrl/losses.h"

namespace fastrl {
namespace cpu {

// Token inputs of one call: every floating tensor in scalar_t, contiguous; optional ones null.
template <typename scalar_t, typename mask_t>
struct LossInputs {
  const scalar_t* logp;
  const scalar_t* old_logp;
  const scalar_t* adv;       // per token, or per row when adv_per_row
  const mask_t* mask;
  const scalar_t* ref;       // null: no KL term
  const scalar_t* entropy;   // null: no entropy term
  const scalar_t* is_w;      // null: no importance weights
  bool adv_per_row;
};

// stats[b * kNumStats + k]: the losses::RowStat columns of row b, fp64, each row summed in token
// order by one thread (deterministic whatever the thread count); dpol[i] / daux[i] (daux may be
// null: no KL term): the token's derivatives (0 at masked tokens), for the backward. Returns -1, or
// the smallest flat index whose mask value is neither 0 nor 1.
template <typename scalar_t, typename mask_t, typename acc_t>
int64_t policy_loss_rows(const LossInputs<scalar_t, mask_t>& in, Rows rows, const losses::Params& p,
                         double* stats, acc_t* dpol, acc_t* daux);

// The finish (losses::finish_* in fastrl/losses.h), the rows in order: returns the loss (scaled, before
// its cast to the output dtype), writes metrics[losses::kNumMetrics] and each row's kWeight /
// kPolicyDiv columns. counts: nullptr or [3] given N, S, B (NaN: not given).
double policy_loss_finish(double* stats, int64_t num_rows, const losses::FinishParams& f, const double* counts,
                          float* metrics);

// The backward, one streaming pass: at valid tokens of row b, with g = the loss's incoming
// gradient times scale and r = losses::row_grad(g, stats, b),
//   grad_logp[i] = losses::token_grad(r, dpol[i], daux[i])
//   grad_entropy[i] = -entropy_coef * r.g_aux          (grad_entropy null: no entropy input)
// and 0 at masked ones. stats: [num_rows, kNumStats] fp64 after the finish.
template <typename mask_t, typename acc_t>
void policy_loss_rows_grad(const mask_t* mask, Rows rows, double g, const double* stats, const acc_t* dpol,
                           const acc_t* daux, double entropy_coef, acc_t* grad_logp, acc_t* grad_entropy);

}  // namespace cpu
}  // namespace fastrl
