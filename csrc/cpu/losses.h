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

// The backward, one streaming pass: at valid tokens of row b (g = grad_rows[b]),
//   grad_logp[i] = losses::token_grad(g[kPolicy], g[kAux], stats[b][kRowMul], stats[b][kRowAdd], dpol, daux)
//   grad_entropy[i] = -entropy_coef * g[kAux]          (grad_entropy null: no entropy input)
// and 0 at masked ones. grad_rows, stats: [num_rows, kNumStats] fp64.
template <typename mask_t, typename acc_t>
void policy_loss_rows_grad(const mask_t* mask, Rows rows, const double* grad_rows, const double* stats,
                           const acc_t* dpol, const acc_t* daux, double entropy_coef, acc_t* grad_logp,
                           acc_t* grad_entropy);

}  // namespace cpu
}  // namespace fastrl
