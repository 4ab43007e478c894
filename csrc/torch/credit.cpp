// torch bindings of the token-level credit-assignment family: schemas, checks, dispatch.
//   broadcast_to_tokens       per-sample -> per-token (outcome rewards), padded or packed
//   gae, discounted_returns   backward affine scans (fastrl/credit.h), padded [B, T] or packed [N]
//   masked_moments            (count, mean, m2) of the masked elements, fp64
//   masked_whiten             verl's masked_whiten, statistics in fp64
//   whiten_with_moments       the same with given (count, mean, m2), e.g. all-reduced over ranks
//   kl_penalty(_backward)     per-token KL estimators (verl / OpenRLHF conventions), elementwise
//   token_rewards             outcome score at the last valid token minus kl_coef * kl
//   gae                       + turn ends (`dones`), modes skip (verl) / reset / dense (OpenRLHF)
//   segment_reduce(_backward) token -> sequence sum / mean / geomean / last
//   discounted_returns        + turn ends (`dones`) with a turn-level discount
//   discounted_returns_whiten REINFORCE++'s whitened, masked returns (statistics fused into the scan)
//   implicit_rewards          PRIME's beta * log-ratio per token or per step
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/credit.h"
#include "torch/checks.h"
#include "torch/memory.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/credit.cuh"
#endif

namespace fastrl {
namespace {

using credit::ReturnsMode;

// ------------------------------------------------------------------------------------ helpers

void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                      const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "fastrl: `", name, "` has shape ", t.sizes(), " but `",
              ref_name, "` has shape ", ref.sizes());
}

void check_unit_interval(double x, const char* name) {
  TORCH_CHECK(x >= 0.0 && x <= 1.0, "fastrl: `", name, "` must lie in [0, 1], got ", x);
}

ReturnsMode parse_mode(const std::string& s) {
  if (s == "skip") return ReturnsMode::kSkip;
  if (s == "reset") return ReturnsMode::kReset;
  if (s == "cumsum") return ReturnsMode::kCumsum;
  TORCH_CHECK(false, "fastrl: `mode` must be one of 'skip', 'reset', 'cumsum'; got '", s, "'");
}

credit::GaeMode parse_gae_mode(c10::string_view mode) {
  const std::string s(mode);
  if (s == "skip") return credit::GaeMode::kSkip;
  if (s == "reset") return credit::GaeMode::kReset;
  if (s == "dense") return credit::GaeMode::kDense;
  TORCH_CHECK_VALUE(false, "fastrl: gae `mode` must be one of 'skip', 'reset', 'dense'; got '", s, "'");
}

// The accumulation/output dtype of a token op: float64 for float64 inputs, float32 otherwise.
at::ScalarType acc_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Validated token layout. Padded: tokens [B, T] (mask the same shape), rows = B. Packed: tokens
// [N] and cu_seqlens (check_cu_seqlens).
cpu::Rows token_rows(const at::Tensor& tokens, const char* name,
                     const c10::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens.has_value()) {
    check_dim(tokens, name, 2);
    return cpu::Rows{nullptr, tokens.size(0), tokens.size(1)};
  }
  const int64_t num_rows = check_cu_seqlens(*cu_seqlens, tokens, name);
  return cpu::Rows{cu_seqlens->data_ptr<int64_t>(), num_rows, 0};
}

// out[b, t] = values[b] * mask[b, t] (padded) or out[i] = values[row of i] * mask[i] (packed),
// with torch's type promotion (what every trainer writes as `values.unsqueeze(-1) * mask`),
// computed by torch's own vectorized multiply into an output allocated for streaming (see
// memory.h): the same bits, fewer page faults. Packed: each token's row comes from the row
// lengths, with the output size N taken from mask's shape (no host sync on CUDA); then the same
// multiply, so both layouts give the same bits.
at::Tensor broadcast_to_tokens(const at::Tensor& values, const at::Tensor& mask,
                               const c10::optional<at::Tensor>& cu_seqlens) {
  check_dim(values, "values", 1);
  check_same_device(mask, "mask", values, "values");
  const cpu::Rows rows = token_rows(mask, "mask", cu_seqlens);
  TORCH_CHECK(rows.num_rows == values.size(0), "fastrl: `mask` has ", rows.num_rows,
              cu_seqlens ? " packed rows" : " rows", " but `values` has ", values.size(0), " entries");
  const auto dtype = at::promote_types(values.scalar_type(), mask.scalar_type());
  at::Tensor out = empty_streaming_output(mask.sizes(), mask.options().dtype(dtype));
  if (!cu_seqlens.has_value()) {
    at::mul_out(out, values.unsqueeze(1), mask);
    return out;
  }
  const at::Tensor row_of_token =
      at::repeat_interleave(at::diff(*cu_seqlens), std::optional<int64_t>(mask.size(0)));
  at::mul_out(out, values.index_select(0, row_of_token), mask);
  return out;
}

void raise_bad_mask(int64_t bad, const at::Tensor& mask) {
  TORCH_CHECK(bad < 0, "fastrl: `mask` must hold only 0 and 1, got ",
              bad < 0 ? 0.0 : mask.reshape({-1})[bad].item<double>(), " at flat index ", bad);
}

struct TokenInputs {
  at::Tensor rewards, values, mask;  // contiguous; values undefined for returns
  cpu::Rows rows;
};

TokenInputs prepare_tokens(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                           const at::Tensor& mask, const c10::optional<at::Tensor>& cu_seqlens) {
  check_floating(rewards, "rewards");
  TokenInputs in;
  in.rows = token_rows(rewards, "rewards", cu_seqlens);
  check_same_shape(mask, "mask", rewards, "rewards");
  check_same_device(mask, "mask", rewards, "rewards");
  check_mask_dtype(mask);
  at::ScalarType dtype = rewards.scalar_type();
  if (values.has_value()) {
    check_floating(*values, "values");
    check_same_shape(*values, "values", rewards, "rewards");
    check_same_device(*values, "values", rewards, "rewards");
    dtype = at::promote_types(dtype, values->scalar_type());
    in.values = values->to(dtype).contiguous();
  }
  in.rewards = rewards.to(dtype).contiguous();
  in.mask = mask.contiguous();
  return in;
}

// Optional per-token flags (turn ends, step ends) as a contiguous bool tensor (undefined when not
// given). Same shape and device as `ref`; 0/1 values checked on the CPU (on CUDA nonzero = done, as for
// the mask: a check would need a host sync).
at::Tensor prepare_flags(const c10::optional<at::Tensor>& flags, const char* name,
                         const at::Tensor& ref, const char* ref_name) {
  if (!flags.has_value()) return at::Tensor();
  const at::Tensor& d = *flags;
  check_same_shape(d, name, ref, ref_name);
  check_same_device(d, name, ref, ref_name);
  const auto s = d.scalar_type();
  TORCH_CHECK(s == at::kBool || s == at::kByte || s == at::kInt || s == at::kLong ||
                  s == at::kFloat || s == at::kDouble,
              "fastrl: `", name, "` must be bool, uint8, int32, int64, float32 or float64, got ", s);
  if (s == at::kBool) return d.contiguous();
  if (d.device().is_cpu()) {
    const at::Tensor bad = at::logical_and(d.ne(0), d.ne(1));
    if (bad.any().item<bool>()) {
      const int64_t i = bad.reshape({-1}).nonzero()[0][0].item<int64_t>();
      TORCH_CHECK(false, "fastrl: `", name, "` must hold only 0 and 1, got ",
                  d.reshape({-1})[i].item<double>(), " at flat index ", i);
    }
  }
  return d.ne(0).contiguous();
}

const bool* flags_ptr(const at::Tensor& flags) {
  return flags.defined() ? flags.data_ptr<bool>() : nullptr;
}

void check_gae_args(double gamma, double lam, double turn_gamma, double turn_lam) {
  check_unit_interval(gamma, "gamma");
  check_unit_interval(lam, "lam");
  check_unit_interval(turn_gamma, "turn_gamma");
  check_unit_interval(turn_lam, "turn_lam");
}

// ------------------------------------------------------------------------------ KL penalty

struct KlSpec {
  credit::KlKind kind;
  credit::KlConvention conv;
  bool straight_through;  // verl's "<kind>+": value of <kind>, gradient of k2
};

KlSpec parse_kl(const std::string& kind, const std::string& convention) {
  KlSpec spec{credit::KlKind::kK1, credit::KlConvention::kVerl, false};
  std::string base = kind;
  if (convention == "verl") {
    if (!base.empty() && base.back() == '+') {
      base.pop_back();
      spec.straight_through = true;
    }
    TORCH_CHECK_VALUE(base != "full",
                      "fastrl: kl_penalty `kind` 'full' needs the full-vocabulary distributions, "
                      "not per-token log-probs (verl 0.9.1 raises NotImplementedError for it too)");
    if (base == "k1" || base == "kl") {
      spec.kind = credit::KlKind::kK1;
    } else if (base == "abs") {
      spec.kind = credit::KlKind::kAbs;
    } else if (base == "k2" || base == "mse") {
      spec.kind = credit::KlKind::kK2;
    } else if (base == "k3" || base == "low_var_kl") {
      spec.kind = credit::KlKind::kK3;
    } else {
      TORCH_CHECK_VALUE(false, "fastrl: kl_penalty `kind` must be one of 'k1', 'kl', 'abs', 'k2', "
                        "'mse', 'k3', 'low_var_kl', each optionally with a '+' suffix (verl's "
                        "straight-through k2 gradient), got '", kind, "'");
    }
  } else if (convention == "openrlhf" || convention == "openrlhf_unclamped") {
    spec.conv = convention == "openrlhf" ? credit::KlConvention::kOpenRLHF
                                         : credit::KlConvention::kOpenRLHFUnclamped;
    if (base == "k1") {
      spec.kind = credit::KlKind::kK1;
    } else if (base == "k2") {
      spec.kind = credit::KlKind::kK2;
    } else if (base == "k3") {
      spec.kind = credit::KlKind::kK3;
    } else {
      TORCH_CHECK_VALUE(false, "fastrl: kl_penalty `kind` must be one of 'k1', 'k2', 'k3' with "
                        "convention='", convention, "', got '", kind, "'");
    }
  } else {
    TORCH_CHECK_VALUE(false, "fastrl: kl_penalty `convention` must be 'verl', 'openrlhf' or "
                      "'openrlhf_unclamped', got '", convention, "'");
  }
  return spec;
}

struct KlInputs {
  at::Tensor logp, ref;  // contiguous, common dtype
  KlSpec spec;
  at::ScalarType out_dtype;
};

KlInputs prepare_kl(const at::Tensor& logp, const at::Tensor& ref_logp, c10::string_view kind,
                    c10::string_view convention) {
  KlInputs in;
  in.spec = parse_kl(std::string(kind), std::string(convention));
  check_floating(logp, "logp");
  check_floating(ref_logp, "ref_logp");
  check_same_shape(ref_logp, "ref_logp", logp, "logp");
  check_same_device(ref_logp, "ref_logp", logp, "logp");
  const auto dtype = at::promote_types(logp.scalar_type(), ref_logp.scalar_type());
  in.logp = logp.to(dtype).contiguous();
  in.ref = ref_logp.to(dtype).contiguous();
  // verl: the inputs' promoted dtype; OpenRLHF (both): float32 (it calls .float() on both).
  in.out_dtype = in.spec.conv == credit::KlConvention::kVerl ? dtype : at::kFloat;
  return in;
}

// Element loops over (scalar_t input, acc_t arithmetic, out_t output): verl keeps the input dtype
// (fp32 arithmetic for half/bf16), OpenRLHF (clamped or not) computes and returns fp32.
#define FASTRL_DISPATCH_KL(in, name, ...)                                                      \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (in).logp.scalar_type(), name, [&] { \
    if ((in).spec.conv == credit::KlConvention::kVerl) {                                      \
      using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>; \
      using out_t = scalar_t;                                                                  \
      __VA_ARGS__();                                                                           \
    } else {                                                                                   \
      using acc_t = float;                                                                     \
      using out_t = float;                                                                     \
      __VA_ARGS__();                                                                           \
    }                                                                                          \
  })

at::Tensor kl_penalty_cpu(const at::Tensor& logp, const at::Tensor& ref_logp, c10::string_view kind,
                          c10::string_view convention) {
  KlInputs in = prepare_kl(logp, ref_logp, kind, convention);
  at::Tensor out = empty_streaming_output(in.logp.sizes(), in.logp.options().dtype(in.out_dtype));
  FASTRL_DISPATCH_KL(in, "fastrl::kl_penalty", [&] {
    cpu::kl_penalty<scalar_t, acc_t, out_t>(in.logp.data_ptr<scalar_t>(), in.ref.data_ptr<scalar_t>(),
                                            in.logp.numel(), in.spec.kind, in.spec.conv,
                                            out.data_ptr<out_t>());
  });
  return out;
}

// The gradient w.r.t. logp (that w.r.t. ref_logp is its negative), in the inputs' common dtype.
// verl's "<kind>+" differentiates as k2.
at::Tensor kl_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& logp,
                                   const at::Tensor& ref_logp, c10::string_view kind,
                                   c10::string_view convention) {
  KlInputs in = prepare_kl(logp, ref_logp, kind, convention);
  check_same_shape(grad, "grad", logp, "logp");
  const at::Tensor g = grad.to(in.out_dtype).contiguous();
  const credit::KlKind grad_kind = in.spec.straight_through ? credit::KlKind::kK2 : in.spec.kind;
  at::Tensor out = empty_streaming_output(in.logp.sizes(), in.logp.options());
  FASTRL_DISPATCH_KL(in, "fastrl::kl_penalty_backward", [&] {
    cpu::kl_penalty_grad<scalar_t, acc_t, out_t>(g.data_ptr<out_t>(), in.logp.data_ptr<scalar_t>(),
                                                 in.ref.data_ptr<scalar_t>(), in.logp.numel(),
                                                 grad_kind, in.spec.conv, out.data_ptr<scalar_t>());
  });
  return out;
}

// --------------------------------------------------------------------------- token rewards

struct RewardInputs {
  at::Tensor scores, mask, kl;  // contiguous; scores clipped; kl undefined when not given
  cpu::Rows rows;
};

RewardInputs prepare_rewards(const at::Tensor& scores, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& kl,
                             const c10::optional<at::Tensor>& cu_seqlens, double kl_coef,
                             c10::optional<double> clip) {
  check_floating(scores, "scores");
  check_dim(scores, "scores", 1);
  check_mask_dtype(mask);
  check_same_device(mask, "mask", scores, "scores");
  TORCH_CHECK_VALUE(kl_coef >= 0.0, "fastrl: `kl_coef` must be >= 0, got ", kl_coef);
  TORCH_CHECK_VALUE(!clip.has_value() || *clip > 0.0, "fastrl: `clip` must be > 0 (scores are "
                    "clipped to [-clip, clip]) or None, got ", clip.value_or(0.0));
  RewardInputs in;
  in.rows = token_rows(mask, "mask", cu_seqlens);
  TORCH_CHECK(scores.size(0) == in.rows.num_rows, "fastrl: `scores` has ", scores.size(0),
              " entries but `mask` has ", in.rows.num_rows, cu_seqlens ? " packed rows" : " rows");
  at::ScalarType dtype = scores.scalar_type();
  if (kl.has_value()) {
    check_floating(*kl, "kl");
    check_same_shape(*kl, "kl", mask, "mask");
    check_same_device(*kl, "kl", mask, "mask");
    dtype = at::promote_types(dtype, kl->scalar_type());
    in.kl = kl->to(dtype).contiguous();
  }
  in.scores = (clip.has_value() ? scores.clamp(-*clip, *clip) : scores).to(dtype).contiguous();
  in.mask = mask.contiguous();
  return in;
}

at::Tensor token_rewards_cpu(const at::Tensor& scores, const at::Tensor& mask,
                             const c10::optional<at::Tensor>& kl,
                             const c10::optional<at::Tensor>& cu_seqlens, double kl_coef,
                             c10::optional<double> clip) {
  RewardInputs in = prepare_rewards(scores, mask, kl, cu_seqlens, kl_coef, clip);
  at::Tensor out = empty_streaming_output(
      in.mask.sizes(), in.scores.options().dtype(acc_dtype(in.scores.scalar_type())));
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::token_rewards", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      bad = cpu::token_rewards<scalar_t, mask_t, acc_t>(
          in.scores.data_ptr<scalar_t>(), in.mask.data_ptr<mask_t>(),
          in.kl.defined() ? in.kl.data_ptr<scalar_t>() : nullptr, in.rows, kl_coef,
          out.data_ptr<acc_t>());
    });
  });
  raise_bad_mask(bad, in.mask);
  return out;
}

// ---------------------------------------------------------------------------------------- CPU

credit::WhitenCoefs whiten_coefficients(const credit::Moments& m, bool shift_mean, bool unbiased,
                                        double eps);

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask,
                                           const c10::optional<at::Tensor>& cu_seqlens,
                                           double gamma, double lam,
                                           const c10::optional<at::Tensor>& dones,
                                           c10::string_view mode, double turn_gamma,
                                           double turn_lam, bool whiten) {
  check_gae_args(gamma, lam, turn_gamma, turn_lam);
  const credit::GaeMode gm = parse_gae_mode(mode);
  TokenInputs in = prepare_tokens(rewards, values, mask, cu_seqlens);
  const at::Tensor done = prepare_flags(dones, "dones", mask, "mask");
  const auto opts = in.rewards.options().dtype(acc_dtype(in.rewards.scalar_type()));
  at::Tensor adv = empty_streaming_output(in.rewards.sizes(), opts);
  at::Tensor ret = empty_streaming_output(in.rewards.sizes(), opts);
  std::vector<credit::Moments> rows(whiten ? static_cast<size_t>(in.rows.num_rows) : 0);
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "fastrl::gae", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      bad = cpu::gae<scalar_t, mask_t, acc_t>(
          in.rewards.data_ptr<scalar_t>(), in.values.data_ptr<scalar_t>(),
          in.mask.data_ptr<mask_t>(), flags_ptr(done), in.rows, gamma, lam, gm, turn_gamma,
          turn_lam, adv.data_ptr<acc_t>(), ret.data_ptr<acc_t>(), whiten ? rows.data() : nullptr);
    });
  });
  raise_bad_mask(bad, in.mask);
  if (whiten) {  // verl's masked_whiten(adv, mask) from the per-row moments, merged in row order
    credit::Moments m = credit::moments_empty();
    for (const auto& row : rows) m = credit::moments_merge(m, row);
    const auto coef = whiten_coefficients(m, /*shift_mean=*/true, /*unbiased=*/true, 1e-8);
    AT_DISPATCH_FLOATING_TYPES(adv.scalar_type(), "fastrl::gae_whiten", [&] {
      cpu::affine_transform<scalar_t>(adv.data_ptr<scalar_t>(), adv.numel(), coef,
                                      adv.data_ptr<scalar_t>());
    });
  }
  return {adv, ret};
}

// The returns scan on the CPU; `row_moments` (nullptr: not wanted) gets each row's moments of the
// returns over its valid tokens. Returns the output and the contiguous mask.
std::tuple<at::Tensor, at::Tensor> returns_scan_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                                    const c10::optional<at::Tensor>& cu_seqlens,
                                                    double gamma, c10::string_view mode,
                                                    const c10::optional<at::Tensor>& dones,
                                                    double turn_gamma,
                                                    std::vector<credit::Moments>* row_moments) {
  check_unit_interval(gamma, "gamma");
  check_unit_interval(turn_gamma, "turn_gamma");
  const ReturnsMode m = parse_mode(std::string(mode));
  TokenInputs in = prepare_tokens(rewards, c10::nullopt, mask, cu_seqlens);
  const at::Tensor done = prepare_flags(dones, "dones", mask, "mask");
  const auto opts = in.rewards.options().dtype(acc_dtype(in.rewards.scalar_type()));
  at::Tensor out = empty_streaming_output(in.rewards.sizes(), opts);
  if (row_moments != nullptr) row_moments->resize(static_cast<size_t>(in.rows.num_rows));
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(),
                                  "fastrl::discounted_returns", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      bad = cpu::discounted_returns<scalar_t, mask_t, acc_t>(
          in.rewards.data_ptr<scalar_t>(), in.mask.data_ptr<mask_t>(), flags_ptr(done), in.rows,
          gamma, m, turn_gamma, out.data_ptr<acc_t>(),
          row_moments != nullptr ? row_moments->data() : nullptr);
    });
  });
  raise_bad_mask(bad, in.mask);
  return {out, in.mask};
}

at::Tensor discounted_returns_cpu(const at::Tensor& rewards, const at::Tensor& mask,
                                  const c10::optional<at::Tensor>& cu_seqlens, double gamma,
                                  c10::string_view mode, const c10::optional<at::Tensor>& dones,
                                  double turn_gamma) {
  return std::get<0>(
      returns_scan_cpu(rewards, mask, cu_seqlens, gamma, mode, dones, turn_gamma, nullptr));
}

// REINFORCE++'s advantages: (masked_whiten(G, mask) * mask, G) with verl's whitening (shift_mean,
// unbiased, eps = 1e-8), its statistics from the rows' moments emitted by the scan (merged in row
// order: deterministic), the whitening and the masking one more pass.
std::tuple<at::Tensor, at::Tensor> discounted_returns_whiten_cpu(
    const at::Tensor& rewards, const at::Tensor& mask, const c10::optional<at::Tensor>& cu_seqlens,
    double gamma, c10::string_view mode, const c10::optional<at::Tensor>& dones, double turn_gamma) {
  std::vector<credit::Moments> rows;
  auto [ret, m] = returns_scan_cpu(rewards, mask, cu_seqlens, gamma, mode, dones, turn_gamma, &rows);
  credit::Moments total = credit::moments_empty();
  for (const auto& row : rows) total = credit::moments_merge(total, row);
  const auto coef = whiten_coefficients(total, /*shift_mean=*/true, /*unbiased=*/true, 1e-8);
  at::Tensor adv = empty_streaming_output(ret.sizes(), ret.options());
  AT_DISPATCH_FLOATING_TYPES(ret.scalar_type(), "fastrl::discounted_returns_whiten", [&] {
    FASTRL_DISPATCH_MASK(m.scalar_type(), [&] {
      cpu::masked_affine_transform<scalar_t, mask_t>(ret.data_ptr<scalar_t>(), m.data_ptr<mask_t>(),
                                                     ret.numel(), coef, adv.data_ptr<scalar_t>());
    });
  });
  return {adv, ret};
}

void check_masked_inputs(const at::Tensor& x, const at::Tensor& mask) {
  check_floating(x, "x");
  check_same_shape(mask, "mask", x, "x");
  check_same_device(mask, "mask", x, "x");
  check_mask_dtype(mask);
}

credit::Moments moments_cpu(const at::Tensor& x, const at::Tensor& mask) {
  const at::Tensor xc = x.contiguous(), mc = mask.contiguous();
  credit::Moments m = credit::moments_empty();
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "fastrl::masked_moments", [&] {
    FASTRL_DISPATCH_MASK(mc.scalar_type(), [&] {
      bad = cpu::masked_moments<scalar_t, mask_t>(xc.data_ptr<scalar_t>(), mc.data_ptr<mask_t>(),
                                                  xc.numel(), &m);
    });
  });
  raise_bad_mask(bad, mc);
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moments_tensors(const credit::Moments& m,
                                                               const at::TensorOptions& opts) {
  const auto f64 = opts.dtype(at::kDouble);
  return {at::scalar_tensor(m.count, f64), at::scalar_tensor(m.mean, f64),
          at::scalar_tensor(m.m2, f64)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_moments_cpu(const at::Tensor& x,
                                                                  const at::Tensor& mask) {
  check_masked_inputs(x, mask);
  return moments_tensors(moments_cpu(x, mask), x.options());
}

// verl raises ValueError for an unbiased variance of fewer than 2 masked elements (its
// masked_var): so do we (TORCH_CHECK_VALUE is a Python ValueError).
void check_whiten_count(double count, bool unbiased) {
  TORCH_CHECK_VALUE(!(unbiased && count == 0.0),
              "fastrl: masked_whiten with unbiased=True needs at least 2 elements where `mask` "
              "is 1, got 0 (verl: \"At least one element in the mask has to be 1.\")");
  TORCH_CHECK_VALUE(!(unbiased && count == 1.0),
              "fastrl: masked_whiten with unbiased=True needs at least 2 elements where `mask` "
              "is 1, got 1 (verl: \"The sum of the mask is one, which can cause a division by zero.\")");
}

// verl's count check, then the whitening's affine coefficients (credit::whiten_coefs).
credit::WhitenCoefs whiten_coefficients(const credit::Moments& m, bool shift_mean, bool unbiased,
                                        double eps) {
  check_whiten_count(m.count, unbiased);
  return credit::whiten_coefs(m, shift_mean, unbiased, eps);
}

at::Tensor masked_whiten_cpu(const at::Tensor& x, const at::Tensor& mask, bool shift_mean,
                             bool unbiased, double eps) {
  check_masked_inputs(x, mask);
  TORCH_CHECK(eps >= 0.0, "fastrl: `eps` must be >= 0, got ", eps);
  const auto coef = whiten_coefficients(moments_cpu(x, mask), shift_mean, unbiased, eps);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_streaming_output(xc.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "fastrl::masked_whiten", [&] {
    cpu::affine_transform<scalar_t>(xc.data_ptr<scalar_t>(), xc.numel(), coef, out.data_ptr<scalar_t>());
  });
  return out;
}

// The statistics argument of whiten_with_moments: fp64 (count, mean, m2) on x's device.
credit::Moments check_moments_arg(const at::Tensor& moments, const at::Tensor& x) {
  check_floating(x, "x");
  TORCH_CHECK(moments.scalar_type() == at::kDouble && moments.dim() == 1 && moments.size(0) == 3,
              "fastrl: `moments` must be a float64 tensor of shape [3] (count, mean, m2), got ",
              moments.scalar_type(), " of shape ", moments.sizes());
  check_same_device(moments, "moments", x, "x");
  if (!moments.is_cpu()) return credit::moments_empty();  // read on the device
  const at::Tensor mc = moments.contiguous();
  const double* p = mc.data_ptr<double>();
  return credit::Moments{p[0], p[1], p[2]};
}

// masked_whiten with statistics from elsewhere (the all-reduced moments of every rank): verl's
// count check, the same coefficients and the same elementwise pass, no fp64 copy of x.
at::Tensor whiten_with_moments_cpu(const at::Tensor& x, const at::Tensor& moments, bool shift_mean,
                                   bool unbiased, double eps) {
  const credit::Moments m = check_moments_arg(moments, x);
  TORCH_CHECK(eps >= 0.0, "fastrl: `eps` must be >= 0, got ", eps);
  const auto coef = whiten_coefficients(m, shift_mean, unbiased, eps);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_streaming_output(xc.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "fastrl::whiten_with_moments", [&] {
    cpu::affine_transform<scalar_t>(xc.data_ptr<scalar_t>(), xc.numel(), coef, out.data_ptr<scalar_t>());
  });
  return out;
}

// ------------------------------------------------------------------------- segment reductions

credit::SegmentReduce parse_reduce(c10::string_view reduce) {
  const std::string r(reduce);
  if (r == "sum") return credit::SegmentReduce::kSum;
  if (r == "mean") return credit::SegmentReduce::kMean;
  if (r == "geomean") return credit::SegmentReduce::kGeomean;
  if (r == "last") return credit::SegmentReduce::kLast;
  TORCH_CHECK_VALUE(false, "fastrl: segment_reduce `reduce` must be one of 'sum', 'mean', 'geomean', "
                    "'last'; got '", r, "'");
}

struct SegmentInputs {
  at::Tensor x, mask;  // contiguous; mask undefined when not given
  cpu::Rows rows;
  credit::SegmentReduce op;
};

SegmentInputs prepare_segment(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& cu_seqlens, c10::string_view reduce) {
  SegmentInputs in;
  in.op = parse_reduce(reduce);
  check_floating(x, "x");
  in.rows = token_rows(x, "x", cu_seqlens);
  if (mask.has_value()) {
    check_same_shape(*mask, "mask", x, "x");
    check_same_device(*mask, "mask", x, "x");
    check_mask_dtype(*mask);
    in.mask = mask->contiguous();
  }
  in.x = x.contiguous();
  return in;
}

// prepare_segment plus the checks of the backward's incoming gradient ([B], x's device).
SegmentInputs prepare_segment_backward(const at::Tensor& grad, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& mask,
                                       const c10::optional<at::Tensor>& cu_seqlens,
                                       c10::string_view reduce) {
  SegmentInputs in = prepare_segment(x, mask, cu_seqlens, reduce);
  check_dim(grad, "grad", 1);
  TORCH_CHECK(grad.size(0) == in.rows.num_rows, "fastrl: `grad` has ", grad.size(0),
              " entries but there are ", in.rows.num_rows, " rows");
  check_same_device(grad, "grad", x, "x");
  return in;
}

// Calls f with mask_t bound to the mask's type (bool when there is no mask: a null pointer).
#define FASTRL_DISPATCH_OPT_MASK(mask, ...)                                         \
  [&] {                                                                             \
    if (!(mask).defined()) {                                                        \
      using mask_t = bool;                                                          \
      return __VA_ARGS__();                                                         \
    }                                                                               \
    return FASTRL_DISPATCH_MASK((mask).scalar_type(), __VA_ARGS__);                 \
  }()

template <typename mask_t>
const mask_t* opt_mask_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.data_ptr<mask_t>() : nullptr;
}

at::Tensor segment_reduce_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                              const c10::optional<at::Tensor>& cu_seqlens, c10::string_view reduce) {
  SegmentInputs in = prepare_segment(x, mask, cu_seqlens, reduce);
  at::Tensor out = at::empty({in.rows.num_rows}, in.x.options().dtype(acc_dtype(in.x.scalar_type())));
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fastrl::segment_reduce", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_OPT_MASK(in.mask, [&] {
      bad = cpu::segment_reduce<scalar_t, mask_t, acc_t>(in.x.data_ptr<scalar_t>(),
                                                         opt_mask_ptr<mask_t>(in.mask), in.rows,
                                                         in.op, out.data_ptr<acc_t>());
    });
  });
  if (bad >= 0) raise_bad_mask(bad, in.mask);
  return out;
}

// d out / d x (the op is not differentiable in mask), in x's dtype; grad is [B].
at::Tensor segment_reduce_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& mask,
                                       const c10::optional<at::Tensor>& cu_seqlens,
                                       c10::string_view reduce) {
  SegmentInputs in = prepare_segment_backward(grad, x, mask, cu_seqlens, reduce);
  at::Tensor grad_x = empty_streaming_output(in.x.sizes(), in.x.options());
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(),
                                  "fastrl::segment_reduce_backward", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const at::Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    FASTRL_DISPATCH_OPT_MASK(in.mask, [&] {
      bad = cpu::segment_reduce_grad<scalar_t, mask_t, acc_t>(
          g.data_ptr<acc_t>(), in.x.data_ptr<scalar_t>(), opt_mask_ptr<mask_t>(in.mask), in.rows,
          in.op, grad_x.data_ptr<scalar_t>());
    });
  });
  if (bad >= 0) raise_bad_mask(bad, in.mask);
  return grad_x;
}

// ----------------------------------------------------------------------------- implicit rewards

struct ImplicitInputs {
  at::Tensor logp, ref, mask, ends;  // contiguous, common dtype; mask, ends undefined when not given
  cpu::Rows rows;
};

ImplicitInputs prepare_implicit(const at::Tensor& logp, const at::Tensor& ref_logp,
                                const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& cu_seqlens,
                                const c10::optional<at::Tensor>& step_ends, double beta) {
  check_floating(logp, "logp");
  check_floating(ref_logp, "ref_logp");
  check_same_shape(ref_logp, "ref_logp", logp, "logp");
  check_same_device(ref_logp, "ref_logp", logp, "logp");
  TORCH_CHECK_VALUE(std::isfinite(beta), "fastrl: `beta` must be finite, got ", beta);
  ImplicitInputs in;
  in.rows = token_rows(logp, "logp", cu_seqlens);
  if (mask.has_value()) {
    check_same_shape(*mask, "mask", logp, "logp");
    check_same_device(*mask, "mask", logp, "logp");
    check_mask_dtype(*mask);
    in.mask = mask->contiguous();
  }
  in.ends = prepare_flags(step_ends, "step_ends", logp, "logp");
  const auto dtype = at::promote_types(logp.scalar_type(), ref_logp.scalar_type());
  in.logp = logp.to(dtype).contiguous();
  in.ref = ref_logp.to(dtype).contiguous();
  return in;
}

at::Tensor implicit_rewards_cpu(const at::Tensor& logp, const at::Tensor& ref_logp,
                                const c10::optional<at::Tensor>& mask,
                                const c10::optional<at::Tensor>& cu_seqlens,
                                const c10::optional<at::Tensor>& step_ends, double beta) {
  ImplicitInputs in = prepare_implicit(logp, ref_logp, mask, cu_seqlens, step_ends, beta);
  const auto dtype = in.logp.scalar_type();
  at::Tensor out = empty_streaming_output(in.logp.sizes(), in.logp.options().dtype(acc_dtype(dtype)));
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastrl::implicit_rewards", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_OPT_MASK(in.mask, [&] {
      bad = cpu::implicit_rewards<scalar_t, mask_t, acc_t>(
          in.logp.data_ptr<scalar_t>(), in.ref.data_ptr<scalar_t>(), opt_mask_ptr<mask_t>(in.mask),
          flags_ptr(in.ends), in.rows, beta, out.data_ptr<acc_t>());
    });
  });
  if (bad >= 0) raise_bad_mask(bad, in.mask);
  return out;
}

// --------------------------------------------------------------------------------------- CUDA

#ifdef FASTRL_WITH_CUDA
// A [k, 3] fp64 tensor holds k credit::Moments (a scan's rows, or fixed chunks), filled on the device.
static_assert(sizeof(credit::Moments) == 3 * sizeof(double), "credit::Moments is 3 doubles");
static_assert(sizeof(credit::WhitenCoefs) == 3 * sizeof(double), "credit::WhitenCoefs is 3 doubles");

at::Tensor moments_buffer(int64_t k, const at::Tensor& like) {
  return at::empty({k, 3}, like.options().dtype(at::kDouble));
}

credit::Moments* moments_ptr(const at::Tensor& buffer) {
  return reinterpret_cast<credit::Moments*>(buffer.data_ptr<double>());
}

// out = masked_whiten(x) (times `mask` when defined: REINFORCE++) from the partial moments `parts`
// ([k, 3]): a one-block kernel merges them in a fixed order and writes the moments and the
// whitening coefficients to a device buffer, the elementwise kernel reads the coefficients there;
// x and out contiguous, out may be x. verl's unbiased count
// check is the op's one host sync (none when biased), made after every kernel is queued so the GPU
// never waits for the host; when it raises, out holds garbage and is not returned.
void whiten_from_parts_cuda(const at::Tensor& parts, const at::Tensor& x, const at::Tensor& mask,
                            bool shift_mean, bool unbiased, double eps, at::Tensor& out) {
  // count, mean, m2, then the credit::WhitenCoefs
  at::Tensor total = at::empty({6}, x.options().dtype(at::kDouble));
  double* t = total.data_ptr<double>();
  auto* coefs = reinterpret_cast<credit::WhitenCoefs*>(t + 3);
  C10_CUDA_CHECK(cuda::launch_merge_moments(moments_ptr(parts), parts.size(0), t, t + 1, t + 2,
                                            coefs, shift_mean, unbiased, eps, stream_of(x)));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastrl::whiten", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    FASTRL_DISPATCH_OPT_MASK(mask, [&] {
      err = cuda::launch_whiten<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(x.data_ptr<scalar_t>()), opt_mask_ptr<mask_t>(mask),
          x.numel(), coefs, reinterpret_cast<cuda_t*>(out.data_ptr<scalar_t>()), stream_of(x));
    });
  });
  C10_CUDA_CHECK(err);
  if (unbiased) check_whiten_count(total[0].item<double>(), true);
}

// With whiten: the scan emits each row's moments of the advantages, then whiten_from_parts_cuda
// whitens them in place (3 launches, 1 host sync).
std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask,
                                            const c10::optional<at::Tensor>& cu_seqlens,
                                            double gamma, double lam,
                                            const c10::optional<at::Tensor>& dones,
                                            c10::string_view mode, double turn_gamma,
                                            double turn_lam, bool whiten) {
  check_gae_args(gamma, lam, turn_gamma, turn_lam);
  const credit::GaeMode gm = parse_gae_mode(mode);
  TokenInputs in = prepare_tokens(rewards, values, mask, cu_seqlens);
  const at::Tensor done = prepare_flags(dones, "dones", mask, "mask");
  const c10::cuda::CUDAGuard guard(in.rewards.device());
  const auto opts = in.rewards.options().dtype(acc_dtype(in.rewards.scalar_type()));
  at::Tensor adv = at::empty(in.rewards.sizes(), opts), ret = at::empty(in.rewards.sizes(), opts);
  const at::Tensor rows = whiten ? moments_buffer(in.rows.num_rows, adv) : at::Tensor();
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(), "fastrl::gae", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = typename cuda::CreditAcc<cuda_t>::type;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      err = cuda::launch_gae<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(in.rewards.data_ptr<scalar_t>()),
          reinterpret_cast<const cuda_t*>(in.values.data_ptr<scalar_t>()),
          in.mask.data_ptr<mask_t>(), flags_ptr(done), in.rows.cu_seqlens, in.rows.num_rows,
          in.rows.row_len, in.rewards.numel(), gamma, lam, gm, turn_gamma, turn_lam,
          adv.data_ptr<acc_t>(), ret.data_ptr<acc_t>(), whiten ? moments_ptr(rows) : nullptr,
          stream_of(in.rewards));
    });
  });
  C10_CUDA_CHECK(err);
  if (whiten) whiten_from_parts_cuda(rows, adv, at::Tensor(), true, true, 1e-8, adv);
  return {adv, ret};
}

// The returns scan on CUDA; `row_moments` (nullptr: not wanted) gets a [B, 3] buffer of each row's
// moments of the returns over its valid tokens. Returns the output and the contiguous mask.
std::tuple<at::Tensor, at::Tensor> returns_scan_cuda(const at::Tensor& rewards, const at::Tensor& mask,
                                                     const c10::optional<at::Tensor>& cu_seqlens,
                                                     double gamma, c10::string_view mode,
                                                     const c10::optional<at::Tensor>& dones,
                                                     double turn_gamma, at::Tensor* row_moments) {
  check_unit_interval(gamma, "gamma");
  check_unit_interval(turn_gamma, "turn_gamma");
  const ReturnsMode m = parse_mode(std::string(mode));
  TokenInputs in = prepare_tokens(rewards, c10::nullopt, mask, cu_seqlens);
  const at::Tensor done = prepare_flags(dones, "dones", mask, "mask");
  const c10::cuda::CUDAGuard guard(in.rewards.device());
  at::Tensor out = at::empty(in.rewards.sizes(),
                             in.rewards.options().dtype(acc_dtype(in.rewards.scalar_type())));
  if (row_moments != nullptr) *row_moments = moments_buffer(in.rows.num_rows, out);
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.rewards.scalar_type(),
                                  "fastrl::discounted_returns", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = typename cuda::CreditAcc<cuda_t>::type;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      err = cuda::launch_discounted_returns<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(in.rewards.data_ptr<scalar_t>()),
          in.mask.data_ptr<mask_t>(), flags_ptr(done), in.rows.cu_seqlens, in.rows.num_rows,
          in.rows.row_len, in.rewards.numel(), gamma, m, turn_gamma, out.data_ptr<acc_t>(),
          row_moments != nullptr ? moments_ptr(*row_moments) : nullptr, stream_of(in.rewards));
    });
  });
  C10_CUDA_CHECK(err);
  return {out, in.mask};
}

at::Tensor discounted_returns_cuda(const at::Tensor& rewards, const at::Tensor& mask,
                                   const c10::optional<at::Tensor>& cu_seqlens, double gamma,
                                   c10::string_view mode, const c10::optional<at::Tensor>& dones,
                                   double turn_gamma) {
  return std::get<0>(
      returns_scan_cuda(rewards, mask, cu_seqlens, gamma, mode, dones, turn_gamma, nullptr));
}

// REINFORCE++ fused as on the CPU: the scan emits the rows' moments, then one pass whitens and
// masks (3 launches, 1 host sync).
std::tuple<at::Tensor, at::Tensor> discounted_returns_whiten_cuda(
    const at::Tensor& rewards, const at::Tensor& mask, const c10::optional<at::Tensor>& cu_seqlens,
    double gamma, c10::string_view mode, const c10::optional<at::Tensor>& dones, double turn_gamma) {
  at::Tensor rows;
  auto [ret, m] = returns_scan_cuda(rewards, mask, cu_seqlens, gamma, mode, dones, turn_gamma, &rows);
  at::Tensor adv = at::empty(ret.sizes(), ret.options());
  whiten_from_parts_cuda(rows, ret, m, true, true, 1e-8, adv);
  return {adv, ret};
}

// The moments of fixed chunks of x (contiguous) over the valid elements: [num_chunks, 3].
at::Tensor chunk_moments_cuda(const at::Tensor& x, const at::Tensor& mask) {
  at::Tensor parts = moments_buffer(cuda::masked_moments_num_chunks(x.numel()), x);
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastrl::masked_moments", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    FASTRL_DISPATCH_MASK(mask.scalar_type(), [&] {
      err = cuda::launch_masked_moments<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(x.data_ptr<scalar_t>()), mask.data_ptr<mask_t>(),
          x.numel(), moments_ptr(parts), stream_of(x));
    });
  });
  C10_CUDA_CHECK(err);
  return parts;
}

// Masked statistics on CUDA: two kernels (chunk moments, fixed-order merge), no fp64 copy of x,
// no host sync; the mask's 0/1 values are not checked (a nonzero value counts as 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_moments_cuda(const at::Tensor& x,
                                                                   const at::Tensor& mask) {
  check_masked_inputs(x, mask);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), mc = mask.contiguous();
  const at::Tensor parts = chunk_moments_cuda(xc, mc);
  const auto f64 = xc.options().dtype(at::kDouble);
  at::Tensor count = at::empty({}, f64), mean = at::empty({}, f64), m2 = at::empty({}, f64);
  C10_CUDA_CHECK(cuda::launch_merge_moments(moments_ptr(parts), parts.size(0), count.data_ptr<double>(),
                                            mean.data_ptr<double>(), m2.data_ptr<double>(),
                                            nullptr, false, false, 0.0, stream_of(xc)));
  return {count, mean, m2};
}

// Three kernels (chunk moments, merge, whitening), one host sync for verl's unbiased count check.
at::Tensor masked_whiten_cuda(const at::Tensor& x, const at::Tensor& mask, bool shift_mean,
                              bool unbiased, double eps) {
  check_masked_inputs(x, mask);
  TORCH_CHECK(eps >= 0.0, "fastrl: `eps` must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  whiten_from_parts_cuda(chunk_moments_cuda(xc, mask.contiguous()), xc, at::Tensor(), shift_mean,
                         unbiased, eps, out);
  return out;
}

// The moments as the one "part" of whiten_from_parts_cuda (merge, coefficients, whitening; the
// unbiased count check is the one host sync).
at::Tensor whiten_with_moments_cuda(const at::Tensor& x, const at::Tensor& moments, bool shift_mean,
                                    bool unbiased, double eps) {
  check_moments_arg(moments, x);
  TORCH_CHECK(eps >= 0.0, "fastrl: `eps` must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  whiten_from_parts_cuda(moments.reshape({1, 3}).contiguous(), xc, at::Tensor(), shift_mean, unbiased, eps, out);
  return out;
}

at::Tensor kl_penalty_cuda(const at::Tensor& logp, const at::Tensor& ref_logp,
                           c10::string_view kind, c10::string_view convention) {
  KlInputs in = prepare_kl(logp, ref_logp, kind, convention);
  const c10::cuda::CUDAGuard guard(in.logp.device());
  at::Tensor out = at::empty(in.logp.sizes(), in.logp.options().dtype(in.out_dtype));
  cudaError_t err = cudaSuccess;
  FASTRL_DISPATCH_KL(in, "fastrl::kl_penalty", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using cuda_out_t = typename CudaScalar<out_t>::type;
    err = cuda::launch_kl_penalty<cuda_t, acc_t, cuda_out_t>(
        reinterpret_cast<const cuda_t*>(in.logp.data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(in.ref.data_ptr<scalar_t>()), in.logp.numel(),
        in.spec.kind, in.spec.conv, reinterpret_cast<cuda_out_t*>(out.data_ptr<out_t>()),
        stream_of(in.logp));
  });
  C10_CUDA_CHECK(err);
  return out;
}

at::Tensor kl_penalty_backward_cuda(const at::Tensor& grad, const at::Tensor& logp,
                                    const at::Tensor& ref_logp, c10::string_view kind,
                                    c10::string_view convention) {
  KlInputs in = prepare_kl(logp, ref_logp, kind, convention);
  check_same_shape(grad, "grad", logp, "logp");
  check_same_device(grad, "grad", logp, "logp");
  const c10::cuda::CUDAGuard guard(in.logp.device());
  const at::Tensor g = grad.to(in.out_dtype).contiguous();
  const credit::KlKind grad_kind = in.spec.straight_through ? credit::KlKind::kK2 : in.spec.kind;
  at::Tensor out = at::empty(in.logp.sizes(), in.logp.options());
  cudaError_t err = cudaSuccess;
  FASTRL_DISPATCH_KL(in, "fastrl::kl_penalty_backward", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using cuda_out_t = typename CudaScalar<out_t>::type;
    err = cuda::launch_kl_penalty_grad<cuda_t, acc_t, cuda_out_t>(
        reinterpret_cast<const cuda_out_t*>(g.data_ptr<out_t>()),
        reinterpret_cast<const cuda_t*>(in.logp.data_ptr<scalar_t>()),
        reinterpret_cast<const cuda_t*>(in.ref.data_ptr<scalar_t>()), in.logp.numel(), grad_kind,
        in.spec.conv, reinterpret_cast<cuda_t*>(out.data_ptr<scalar_t>()), stream_of(in.logp));
  });
  C10_CUDA_CHECK(err);
  return out;
}

// Mask values are not checked on CUDA (nonzero counts as valid; cuda/credit.cuh).
at::Tensor token_rewards_cuda(const at::Tensor& scores, const at::Tensor& mask,
                              const c10::optional<at::Tensor>& kl,
                              const c10::optional<at::Tensor>& cu_seqlens, double kl_coef,
                              c10::optional<double> clip) {
  RewardInputs in = prepare_rewards(scores, mask, kl, cu_seqlens, kl_coef, clip);
  const c10::cuda::CUDAGuard guard(in.mask.device());
  at::Tensor out = at::empty(in.mask.sizes(),
                             in.scores.options().dtype(acc_dtype(in.scores.scalar_type())));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::token_rewards", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = typename cuda::CreditAcc<cuda_t>::type;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      err = cuda::launch_token_rewards<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(in.scores.data_ptr<scalar_t>()),
          in.mask.data_ptr<mask_t>(),
          in.kl.defined() ? reinterpret_cast<const cuda_t*>(in.kl.data_ptr<scalar_t>()) : nullptr,
          in.rows.cu_seqlens, in.rows.num_rows, in.rows.row_len, in.mask.numel(), kl_coef,
          out.data_ptr<acc_t>(), stream_of(in.mask));
    });
  });
  C10_CUDA_CHECK(err);
  return out;
}

// Mask values and cu_seqlens are not checked on CUDA (cuda/credit.cuh).
at::Tensor segment_reduce_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                               const c10::optional<at::Tensor>& cu_seqlens, c10::string_view reduce) {
  SegmentInputs in = prepare_segment(x, mask, cu_seqlens, reduce);
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor out = at::empty({in.rows.num_rows}, in.x.options().dtype(acc_dtype(in.x.scalar_type())));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "fastrl::segment_reduce", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = typename cuda::CreditAcc<cuda_t>::type;
    FASTRL_DISPATCH_OPT_MASK(in.mask, [&] {
      err = cuda::launch_segment_reduce<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(in.x.data_ptr<scalar_t>()), opt_mask_ptr<mask_t>(in.mask),
          in.rows.cu_seqlens, in.rows.num_rows, in.rows.row_len, in.x.numel(), in.op,
          out.data_ptr<acc_t>(), stream_of(in.x));
    });
  });
  C10_CUDA_CHECK(err);
  return out;
}

at::Tensor segment_reduce_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                        const c10::optional<at::Tensor>& mask,
                                        const c10::optional<at::Tensor>& cu_seqlens,
                                        c10::string_view reduce) {
  SegmentInputs in = prepare_segment_backward(grad, x, mask, cu_seqlens, reduce);
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor grad_x = at::empty(in.x.sizes(), in.x.options());
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(),
                                  "fastrl::segment_reduce_backward", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = typename cuda::CreditAcc<cuda_t>::type;
    const at::Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    FASTRL_DISPATCH_OPT_MASK(in.mask, [&] {
      err = cuda::launch_segment_reduce_grad<cuda_t, mask_t>(
          g.data_ptr<acc_t>(), reinterpret_cast<const cuda_t*>(in.x.data_ptr<scalar_t>()),
          opt_mask_ptr<mask_t>(in.mask), in.rows.cu_seqlens, in.rows.num_rows, in.rows.row_len,
          in.x.numel(), in.op, reinterpret_cast<cuda_t*>(grad_x.data_ptr<scalar_t>()),
          stream_of(in.x));
    });
  });
  C10_CUDA_CHECK(err);
  return grad_x;
}

// Mask values, step_ends flags and cu_seqlens are not checked on CUDA (cuda/credit.cuh).
at::Tensor implicit_rewards_cuda(const at::Tensor& logp, const at::Tensor& ref_logp,
                                 const c10::optional<at::Tensor>& mask,
                                 const c10::optional<at::Tensor>& cu_seqlens,
                                 const c10::optional<at::Tensor>& step_ends, double beta) {
  ImplicitInputs in = prepare_implicit(logp, ref_logp, mask, cu_seqlens, step_ends, beta);
  const c10::cuda::CUDAGuard guard(in.logp.device());
  const auto dtype = in.logp.scalar_type();
  at::Tensor out = at::empty(in.logp.sizes(), in.logp.options().dtype(acc_dtype(dtype)));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastrl::implicit_rewards", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using acc_t = typename cuda::CreditAcc<cuda_t>::type;
    FASTRL_DISPATCH_OPT_MASK(in.mask, [&] {
      err = cuda::launch_implicit_rewards<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(in.logp.data_ptr<scalar_t>()),
          reinterpret_cast<const cuda_t*>(in.ref.data_ptr<scalar_t>()),
          opt_mask_ptr<mask_t>(in.mask), flags_ptr(in.ends), in.rows.cu_seqlens,
          in.rows.num_rows, in.rows.row_len, in.logp.numel(), beta, out.data_ptr<acc_t>(),
          stream_of(in.logp));
    });
  });
  C10_CUDA_CHECK(err);
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def("broadcast_to_tokens(Tensor values, Tensor mask, Tensor? cu_seqlens=None) -> Tensor");
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, Tensor? cu_seqlens, float gamma, float lam,"
      " Tensor? dones=None, str mode='skip', float turn_gamma=0.0, float turn_lam=1.0,"
      " bool whiten=False)"
      " -> (Tensor advantages, Tensor returns)");
  m.def(
      "discounted_returns(Tensor rewards, Tensor mask, Tensor? cu_seqlens, float gamma, str mode,"
      " Tensor? dones=None, float turn_gamma=0.0) -> Tensor");
  m.def(
      "discounted_returns_whiten(Tensor rewards, Tensor mask, Tensor? cu_seqlens, float gamma,"
      " str mode, Tensor? dones=None, float turn_gamma=0.0) -> (Tensor advantages, Tensor returns)");
  m.def("masked_moments(Tensor x, Tensor mask) -> (Tensor count, Tensor mean, Tensor m2)");
  m.def("masked_whiten(Tensor x, Tensor mask, bool shift_mean, bool unbiased, float eps) -> Tensor");
  m.def("whiten_with_moments(Tensor x, Tensor moments, bool shift_mean, bool unbiased, float eps) -> Tensor");
  m.def("kl_penalty(Tensor logp, Tensor ref_logp, str kind, str convention) -> Tensor");
  m.def(
      "kl_penalty_backward(Tensor grad, Tensor logp, Tensor ref_logp, str kind, str convention)"
      " -> Tensor");
  m.def(
      "token_rewards(Tensor scores, Tensor mask, Tensor? kl, Tensor? cu_seqlens, float kl_coef,"
      " float? clip) -> Tensor");
  m.def("segment_reduce(Tensor x, Tensor? mask, Tensor? cu_seqlens, str reduce) -> Tensor");
  m.def(
      "segment_reduce_backward(Tensor grad, Tensor x, Tensor? mask, Tensor? cu_seqlens, str reduce)"
      " -> Tensor");
  m.def(
      "implicit_rewards(Tensor logp, Tensor ref_logp, Tensor? mask, Tensor? cu_seqlens,"
      " Tensor? step_ends, float beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("broadcast_to_tokens", &broadcast_to_tokens);
  m.impl("gae", &gae_cpu);
  m.impl("discounted_returns", &discounted_returns_cpu);
  m.impl("discounted_returns_whiten", &discounted_returns_whiten_cpu);
  m.impl("masked_moments", &masked_moments_cpu);
  m.impl("masked_whiten", &masked_whiten_cpu);
  m.impl("whiten_with_moments", &whiten_with_moments_cpu);
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cpu);
  m.impl("token_rewards", &token_rewards_cpu);
  m.impl("segment_reduce", &segment_reduce_cpu);
  m.impl("segment_reduce_backward", &segment_reduce_backward_cpu);
  m.impl("implicit_rewards", &implicit_rewards_cpu);
}

TORCH_LIBRARY_IMPL(fastrl, CUDA, m) {
  m.impl("broadcast_to_tokens", &broadcast_to_tokens);
#ifdef FASTRL_WITH_CUDA
  m.impl("gae", &gae_cuda);
  m.impl("discounted_returns", &discounted_returns_cuda);
  m.impl("discounted_returns_whiten", &discounted_returns_whiten_cuda);
  m.impl("masked_moments", &masked_moments_cuda);
  m.impl("masked_whiten", &masked_whiten_cuda);
  m.impl("whiten_with_moments", &whiten_with_moments_cuda);
  m.impl("kl_penalty", &kl_penalty_cuda);
  m.impl("kl_penalty_backward", &kl_penalty_backward_cuda);
  m.impl("token_rewards", &token_rewards_cuda);
  m.impl("segment_reduce", &segment_reduce_cuda);
  m.impl("segment_reduce_backward", &segment_reduce_backward_cuda);
  m.impl("implicit_rewards", &implicit_rewards_cuda);
#endif
}

}  // namespace fastrl
