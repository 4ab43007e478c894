// CPU kernels of the token-level credit-assignment family. Raw pointers only; csrc/torch/ checks
// and dispatches. Bad mask values are reported by returning an index, never by throwing.
#pragma once

#include <cstdint>

#include "fastrl/credit.h"

namespace fastrl {
namespace cpu {

// The rows of a token layout: padded (cu_seqlens == nullptr: row b is [b * row_len, (b+1) * row_len))
// or packed (row b is [cu_seqlens[b], cu_seqlens[b+1]), cu_seqlens already validated).
struct Rows {
  const int64_t* cu_seqlens;
  int64_t num_rows;
  int64_t row_len;
};

// acc_t is the inputs' type for float/double and float for half/bfloat16; outputs are acc_t.
// mask_t: bool, uint8, int32, int64, float, double. A mask value must be 0 or 1.
// Each returns -1, or the smallest flat index whose mask value is neither 0 nor 1 (the outputs
// are then unspecified).

// GAE (fastrl/credit.h) per row in credit::GaeMode `mode`, with turn ends at dones[i] (nullptr:
// none; see credit::GaeCoefs): adv[i], ret[i] at every position i. gamma * lam and
// turn_gamma * turn_lam are multiplied in double and rounded once to acc_t (verl's order).
// row_moments (nullptr: not wanted) receives each row's credit::Moments of adv over its valid
// tokens, computed right after the row while it is in cache (fused whitening: no statistics pass).
template <typename scalar_t, typename mask_t, typename acc_t>
int64_t gae(const scalar_t* rewards, const scalar_t* values, const mask_t* mask, const bool* dones,
            Rows rows, double gamma, double lam, credit::GaeMode mode, double turn_gamma,
            double turn_lam, acc_t* adv, acc_t* ret, credit::Moments* row_moments);

// Discounted returns-to-go per row in one of the credit::ReturnsMode semantics, with turn ends at
// dones[i] (nullptr: none) discounted by turn_gamma (credit::returns_turn_step). row_moments
// (nullptr: not wanted) receives each row's credit::Moments of out over its valid tokens, as gae's.
template <typename scalar_t, typename mask_t, typename acc_t>
int64_t discounted_returns(const scalar_t* rewards, const mask_t* mask, const bool* dones,
                           Rows rows, double gamma, credit::ReturnsMode mode, double turn_gamma,
                           acc_t* out, credit::Moments* row_moments);

// (count, mean, m2) of the x[i] whose mask[i] is 1, over n elements (credit::Moments).
template <typename scalar_t, typename mask_t>
int64_t masked_moments(const scalar_t* x, const mask_t* mask, int64_t n, credit::Moments* out);

// out[i] = credit::whiten_value(x[i], k) (fp64), rounded once to scalar_t.
template <typename scalar_t>
void affine_transform(const scalar_t* x, int64_t n, const credit::WhitenCoefs& k, scalar_t* out);

// out[i] = scalar_t(credit::whiten_value(x[i], k)) * scalar_t(mask[i]): affine_transform, then
// torch's `out * mask` in scalar_t (mask values are not checked here).
template <typename scalar_t, typename mask_t>
void masked_affine_transform(const scalar_t* x, const mask_t* mask, int64_t n,
                             const credit::WhitenCoefs& k, scalar_t* out);

// out[i] = credit::kl_value<kind, conv>(logp[i], ref[i]) computed in acc_t, rounded to out_t.
template <typename scalar_t, typename acc_t, typename out_t>
void kl_penalty(const scalar_t* logp, const scalar_t* ref, int64_t n, credit::KlKind kind,
                credit::KlConvention conv, out_t* out);

// grad_logp[i] = grad[i] * credit::kl_grad<kind, conv>(logp[i], ref[i]) in acc_t, rounded to scalar_t.
template <typename scalar_t, typename acc_t, typename out_t>
void kl_penalty_grad(const out_t* grad, const scalar_t* logp, const scalar_t* ref, int64_t n,
                     credit::KlKind kind, credit::KlConvention conv, scalar_t* grad_logp);

// credit::token_reward per row (rows in parallel, each walked once from its end): scores[b]
// (already clipped) at the row's last valid token, minus kl_coef * kl (kl == nullptr: no KL).
template <typename scalar_t, typename mask_t, typename acc_t>
int64_t token_rewards(const scalar_t* scores, const mask_t* mask, const scalar_t* kl, Rows rows,
                      double kl_coef, acc_t* out);


// credit::segment_value per row (rows in parallel, each summed in fp64 in token order): out[b].
// mask == nullptr: every token is valid.
template <typename scalar_t, typename mask_t, typename out_t>
int64_t segment_reduce(const scalar_t* x, const mask_t* mask, Rows rows, credit::SegmentReduce op,
                       out_t* out);

// grad_x[i] = grad[b] * credit::segment_grad(...) at valid tokens of row b, 0 at masked ones.
template <typename scalar_t, typename mask_t, typename out_t>
int64_t segment_reduce_grad(const out_t* grad, const scalar_t* x, const mask_t* mask, Rows rows,
                            credit::SegmentReduce op, scalar_t* grad_x);

// PRIME implicit rewards per row (rows in parallel, each walked once in order): r_i =
// credit::implicit_reward(logp[i], ref[i], beta) at valid tokens (mask == nullptr: all valid), 0 at
// masked ones. With step_ends (nullptr: per token), each step's r summed in fp64 is written at the
// step's last valid token and 0 elsewhere; a flag on a masked token closes the step at the valid
// token before it, and the tokens after a row's last flag form a final step.
template <typename scalar_t, typename mask_t, typename acc_t>
int64_t implicit_rewards(const scalar_t* logp, const scalar_t* ref, const mask_t* mask,
                         const bool* step_ends, Rows rows, double beta, acc_t* out);

}  // namespace cpu
}  // namespace fastrl
