// Token sampling math shared by the CPU and CUDA kernels (fastrl.sampling.sample).
//
// Per row of V logits x with per-row parameters (T, k, p, min_p) and one uniform u in [0, 1):
//   z_j = float(x_j) * float(1 / T)        scaled logits (fp32, as fastrl.logprobs)
//   m   = max_j z_j,  e_j = expf(z_j - m)  in [0, 1], e = 1 at the max
//   w_j = floor(e_j * 2^44)                the token's mass as a 64-bit integer ("fixed point")
// Every mass below (raw, top-k, top-p, kept, the inverse-CDF prefix) is an integer sum of w, so it
// is exact: it does not depend on the summation order, the thread count or the device, and the CPU
// and CUDA kernels agree on every threshold and token whenever they agree on e (expf may differ in
// the last bit between the two). Tokens with e_j < 2^-44 (probability below 5.7e-14 times the most
// likely token's) have w_j = 0 and are never sampled; they carry < V * 2^-44 of the mass.
//
// Processors, in this order (HF / vLLM): temperature, top-k, top-p over the top-k-renormalized
// distribution, min-p relative to the most likely token. The kept set is K = Kk ∩ Kp ∩ Kmin:
//   Kk   = { j : z_j >= t_k },  t_k = the k-th largest z (all j when k >= V). Ties with the k-th
//          value are all kept, so |Kk| may exceed k.
//   Kp   = { j : e_j >= v_p },  v_p = the largest e_j (j in Kk, w_j > 0) such that the mass of
//          { i in Kk : e_i >= v_p } reaches p * mass(Kk): the smallest value-threshold set with
//          mass >= p (ties kept); all j when p = 1.
//   Kmin = { j : e_j >= min_p } (e_j is p_j / max p; invariant to the renormalizations above).
// Sampling: with W = sum_{j in K} w_j and t = floor(u * W), the token is the first j in index
// order whose prefix sum over K (inclusive) exceeds t: P(j) = w_j / W for j in K.
// Log-probs of the chosen token y: processed = z_y - m - log(W / 2^44), raw = z_y - m - log(R / 2^44)
// with R = sum_j w_j (the temperature-scaled distribution, before truncation).
#pragma once

#include "fastrl/common.h"

namespace fastrl {
namespace sampling {

constexpr int kFixedBits = 44;
constexpr float kFixedScale = 17592186044416.0f;  // 2^44
// sum_j w_j <= V * 2^44 must fit in 64 bits.
constexpr int64_t kMaxVocab = (int64_t{1} << 20) - 1;

// floor(e * 2^44) for e in [0, 1] (the product is exact: a power-of-two scaling).
FASTRL_HOST_DEVICE uint64_t to_fixed(float e) { return static_cast<uint64_t>(e * kFixedScale); }

// Where a row's parameters come from: a per-row array when given, else the scalar.
struct ParamSource {
  const double* temperature;  // [N] or nullptr
  const int64_t* top_k;
  const double* top_p;
  const double* min_p;
  double temperature_scalar;
  int64_t top_k_scalar;  // >= V: no top-k
  double top_p_scalar;   // 1: no top-p
  double min_p_scalar;   // 0: no min-p
};

struct RowParams {
  double temperature;
  int64_t top_k;
  double top_p;
  double min_p;
};

FASTRL_HOST_DEVICE RowParams row_params(const ParamSource& src, int64_t r) {
  RowParams p;
  p.temperature = src.temperature != nullptr ? src.temperature[r] : src.temperature_scalar;
  p.top_k = src.top_k != nullptr ? src.top_k[r] : src.top_k_scalar;
  p.top_p = src.top_p != nullptr ? src.top_p[r] : src.top_p_scalar;
  p.min_p = src.min_p != nullptr ? src.min_p[r] : src.min_p_scalar;
  return p;
}

// T finite > 0, k >= 1, p in (0, 1], min_p in [0, 1] (written so that NaN fails).
FASTRL_HOST_DEVICE bool params_valid(const RowParams& p) {
  return p.temperature > 0.0 && p.temperature < INFINITY && p.top_k >= 1 && p.top_p > 0.0 &&
         p.top_p <= 1.0 && p.min_p >= 0.0 && p.min_p <= 1.0;
}

FASTRL_HOST_DEVICE float inv_temperature(const RowParams& p) {
  return static_cast<float>(1.0 / p.temperature);
}

// A row can be sampled when its max scaled logit is finite and no scaled logit is NaN (a NaN or
// +inf logit, or only -inf logits, make the distribution undefined).
FASTRL_HOST_DEVICE bool row_valid(float max_z, bool any_nan) {
  return !any_nan && max_z > -INFINITY && max_z < INFINITY;
}

// Does a mass (an integer sum of w) reach a target (p * mass(Kk), or k for top-k counts)?
FASTRL_HOST_DEVICE bool mass_reaches(uint64_t mass, double target) {
  return static_cast<double>(mass) >= target;
}

FASTRL_HOST_DEVICE double top_p_target(uint64_t topk_mass, double p) {
  return mul_rn(p, static_cast<double>(topk_mass));
}

// The thresholds that define the kept set K.
struct Thresholds {
  float z_min;   // t_k (-inf: no top-k)
  float e_min;   // v_p (0: no top-p)
  double min_p;  // (0: no min-p)
};

FASTRL_HOST_DEVICE bool truncates(const Thresholds& th) {
  return th.z_min > -INFINITY || th.e_min > 0.0f || th.min_p > 0.0;
}

FASTRL_HOST_DEVICE bool kept(float z, float e, const Thresholds& th) {
  return z >= th.z_min && e >= th.e_min && static_cast<double>(e) >= th.min_p;
}

// t = floor(u * W) clamped to [0, W - 1] (u outside [0, 1) or NaN cannot pick a token outside K).
FASTRL_HOST_DEVICE uint64_t sample_target(double u, uint64_t kept_mass) {
  const double t = mul_rn(u, static_cast<double>(kept_mass));
  if (!(t > 0.0)) return 0;
  const uint64_t ti = t < static_cast<double>(kept_mass) ? static_cast<uint64_t>(t) : kept_mass;
  return ti < kept_mass ? ti : kept_mass - 1;
}

// log(mass / 2^44) subtracted from z - m, in fp64, rounded once to fp32.
FASTRL_HOST_DEVICE float token_logprob(float z_minus_m, uint64_t mass) {
  const double log_mass = log(static_cast<double>(mass)) - kFixedBits * 0.69314718055994530942;
  return static_cast<float>(static_cast<double>(z_minus_m) - log_mass);
}

// An order-preserving map of floats (not NaN) to unsigned integers, and back: the keys of the
// selection of the top-k threshold on the GPU (e >= 0 is ordered by its bits alone).
FASTRL_HOST_DEVICE uint32_t float_key(uint32_t bits) {
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}
FASTRL_HOST_DEVICE uint32_t key_bits(uint32_t key) {
  return (key & 0x80000000u) != 0 ? key & 0x7fffffffu : ~key;
}

}  // namespace sampling
}  // namespace fastrl
