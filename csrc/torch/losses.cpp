// torch bindings of the fused policy-loss family: schemas, checks, dispatch.
//   policy_loss_rows           the aggregated loss of a policy loss (+ KL + entropy terms) and its
//                              metrics (float32 [kNumMetrics]), from per-row fp64 statistics and
//                              each token's derivatives (one pass over the tokens, fastrl/losses.h)
//                              and one small reduction over the rows (the finish); the rows and the
//                              derivatives are returned for the backward
//   policy_loss_rows_backward  d loss / d logp and d loss / d entropy from d loss: one streaming
//                              pass over the saved derivatives, in the inputs' dtypes
// Counts given by the caller (num_tokens / num_seqs as numbers, or a [3] device tensor such as a
// process group's all-reduced N, S, B) replace the local ones in the weights, without a host sync.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "cpu/losses.h"
#include "torch/checks.h"
#include "torch/memory.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/losses.cuh"
#endif

namespace fastrl {
namespace {

using losses::Kind;
using losses::KlMode;
using losses::RatioLevel;

// Every kind of fastrl.losses.policy_loss (losses.KINDS): clip_cov and kl_cov are its Python
// compositions of this op (a token selection, then kind 'vanilla'), named here so the message is complete.
Kind parse_kind(const std::string& s) {
  if (s == "vanilla") return Kind::kVanilla;
  if (s == "gpg" || s == "reinforce") return Kind::kGpg;
  if (s == "cispo") return Kind::kCispo;
  if (s == "gspo") return Kind::kGspo;
  if (s == "sapo") return Kind::kSapo;
  if (s == "geo_mean") return Kind::kGeoMean;
  TORCH_CHECK_VALUE(s != "clip_cov" && s != "kl_cov", "fastrl: kind '", s, "' is computed by "
                    "fastrl.losses.policy_loss (a token selection, then this op with kind 'vanilla'), not by "
                    "the policy_loss_rows op itself");
  TORCH_CHECK_VALUE(false, "fastrl: policy_loss `kind` must be one of 'vanilla', 'gpg', 'reinforce', 'cispo', "
                    "'gspo', 'sapo', 'geo_mean', 'clip_cov', 'kl_cov'; got '", s, "'");
}

KlMode parse_kl_kind(const std::string& s) {
  if (s == "k1" || s == "kl") return KlMode::kK1;
  if (s == "abs") return KlMode::kAbs;
  if (s == "k2" || s == "mse") return KlMode::kK2;
  if (s == "k3" || s == "low_var_kl") return KlMode::kK3;
  if (s == "k3_unclamped") return KlMode::kK3Trl;
  TORCH_CHECK_VALUE(false, "fastrl: policy_loss `kl_kind` must be one of 'k1', 'kl', 'abs', 'k2', 'mse', "
                    "'k3', 'low_var_kl', 'k3_unclamped'; got '", s, "'");
}

losses::Agg parse_agg(const std::string& s) {
  if (s == "token-mean" || s == "bnpo") return losses::Agg::kTokenMean;
  if (s == "token-sum") return losses::Agg::kTokenSum;
  if (s == "seq-mean-token-sum") return losses::Agg::kSeqMeanTokenSum;
  if (s == "seq-mean-token-sum-norm") return losses::Agg::kSeqMeanTokenSumNorm;
  if (s == "seq-mean-token-mean") return losses::Agg::kSeqMeanTokenMean;
  if (s == "grpo") return losses::Agg::kGrpo;
  if (s == "dr_grpo") return losses::Agg::kDrGrpo;
  if (s == "luspo") return losses::Agg::kLuspo;
  TORCH_CHECK_VALUE(false, "fastrl: policy_loss `agg` must be one of token-mean, token-sum, seq-mean-token-sum, "
                    "seq-mean-token-mean, seq-mean-token-sum-norm, grpo, bnpo, dr_grpo, luspo; got '", s, "'");
}

losses::Params make_params(c10::string_view kind, c10::string_view ratio_level, double clip_low,
                           double clip_high, c10::optional<double> dual_clip,
                           c10::optional<double> log_ratio_clamp, c10::optional<double> delta,
                           double tau_pos, double tau_neg, double kl_coef, c10::string_view kl_kind,
                           double entropy_coef, bool has_ref) {
  losses::Params p;
  p.kind = parse_kind(std::string(kind));
  const std::string level(ratio_level);
  TORCH_CHECK_VALUE(level == "token" || level == "sequence",
                    "fastrl: policy_loss `ratio_level` must be 'token' or 'sequence'; got '", level, "'");
  p.level = level == "token" ? RatioLevel::kToken : RatioLevel::kSequence;
  if (p.kind == Kind::kCispo) {
    // CISPO clamps a stop-gradient weight, not the objective: any range [1 - clip_low, 1 + clip_high]
    // with a positive cap is meaningful, as torch.clamp in verl and TRL (TRL caps the ratio at
    // epsilon_high: clip_low = 1, clip_high = epsilon_high - 1; verl's clip_ratio_low >= 1: no lower clip).
    TORCH_CHECK_VALUE(std::isfinite(clip_high) && 1.0 + clip_high > 0.0, "fastrl: policy_loss kind='cispo' "
                      "needs a finite `clip_high` with 1 + clip_high > 0 (the cap of the clipped ratio), got ",
                      clip_high);
    TORCH_CHECK_VALUE(std::isfinite(clip_low) && 1.0 - clip_low <= 1.0 + clip_high, "fastrl: policy_loss "
                      "kind='cispo' needs a finite `clip_low` with 1 - clip_low <= 1 + clip_high (a non-empty "
                      "clip range), got clip_low=", clip_low, " and clip_high=", clip_high);
  } else {
    TORCH_CHECK_VALUE(clip_low > 0.0 && clip_low <= 1.0, "fastrl: policy_loss `clip_low` must lie in (0, 1] "
                      "(the ratio is clipped below at 1 - clip_low), got ", clip_low);
    TORCH_CHECK_VALUE(clip_high > 0.0 && std::isfinite(clip_high), "fastrl: policy_loss `clip_high` must be "
                      "> 0 and finite, got ", clip_high);
  }
  TORCH_CHECK_VALUE(!dual_clip.has_value() || *dual_clip > 1.0, "fastrl: policy_loss `dual_clip` must be "
                    "> 1 (the lower bound of the ratio for A < 0, verl's clip_ratio_c) or None, got ",
                    dual_clip.value_or(0.0));
  TORCH_CHECK_VALUE(!log_ratio_clamp.has_value() || *log_ratio_clamp > 0.0, "fastrl: policy_loss "
                    "`log_ratio_clamp` must be > 0 or None, got ", log_ratio_clamp.value_or(0.0));
  TORCH_CHECK_VALUE(!delta.has_value() || *delta > 1.0, "fastrl: policy_loss `delta` must be > 1 "
                    "(TRL's two-sided clip) or None, got ", delta.value_or(0.0));
  TORCH_CHECK_VALUE(tau_pos > 0.0 && tau_neg > 0.0, "fastrl: policy_loss `tau_pos` and `tau_neg` must be "
                    "> 0, got ", tau_pos, " and ", tau_neg);
  TORCH_CHECK_VALUE(std::isfinite(kl_coef) && std::isfinite(entropy_coef), "fastrl: policy_loss "
                    "`kl_coef` and `entropy_coef` must be finite, got ", kl_coef, " and ", entropy_coef);
  p.clip_low = clip_low;
  p.clip_high = clip_high;
  p.clip_lo = 1.0 - clip_low;
  p.clip_hi = 1.0 + clip_high;
  p.dual_clip = dual_clip.value_or(0.0);
  p.log_clamp = log_ratio_clamp.value_or(0.0);
  p.delta = delta.value_or(0.0);
  p.tau_pos = tau_pos;
  p.tau_neg = tau_neg;
  p.kl_coef = kl_coef;
  p.entropy_coef = entropy_coef;
  p.kl = has_ref ? parse_kl_kind(std::string(kl_kind)) : KlMode::kNone;
  return p;
}

struct LossTensors {
  at::Tensor logp, old_logp, adv, mask, ref, entropy, is_w;  // contiguous, one floating dtype
  bool adv_per_row = false;
  cpu::Rows rows{nullptr, 0, 0};
};

// Validates the layout (padded [B, T] or packed [N] + cu_seqlens) and converts the floating inputs
// to their promoted dtype (a no-op when they share it).
LossTensors prepare(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                    const at::Tensor& mask, const c10::optional<at::Tensor>& ref_logp,
                    const c10::optional<at::Tensor>& entropy, const c10::optional<at::Tensor>& is_weights,
                    const c10::optional<at::Tensor>& cu_seqlens) {
  LossTensors t;
  check_floating(logp, "logp");
  if (cu_seqlens.has_value()) {
    const int64_t num_rows = check_cu_seqlens(*cu_seqlens, logp, "logp");
    t.rows = cpu::Rows{cu_seqlens->data_ptr<int64_t>(), num_rows, 0};
  } else {
    check_dim(logp, "logp", 2);
    t.rows = cpu::Rows{nullptr, logp.size(0), logp.size(1)};
  }
  auto same_shape = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.sizes() == logp.sizes(), "fastrl: `", name, "` has shape ", x.sizes(),
                " but `logp` has shape ", logp.sizes());
    check_same_device(x, name, logp, "logp");
  };
  check_floating(old_logp, "old_logp");
  same_shape(old_logp, "old_logp");
  same_shape(mask, "mask");
  check_mask_dtype(mask);
  check_floating(advantages, "advantages");
  check_same_device(advantages, "advantages", logp, "logp");
  if (advantages.sizes() != logp.sizes()) {
    TORCH_CHECK(advantages.dim() == 1 && advantages.size(0) == t.rows.num_rows, "fastrl: `advantages` must "
                "have `logp`'s shape ", logp.sizes(), " (per token) or [", t.rows.num_rows,
                "] (per sequence), got shape ", advantages.sizes());
    t.adv_per_row = true;
  }
  at::ScalarType dtype = at::promote_types(logp.scalar_type(), old_logp.scalar_type());
  dtype = at::promote_types(dtype, advantages.scalar_type());
  auto optional_input = [&](const c10::optional<at::Tensor>& x, const char* name) {
    if (!x.has_value()) return;
    check_floating(*x, name);
    same_shape(*x, name);
    dtype = at::promote_types(dtype, x->scalar_type());
  };
  optional_input(ref_logp, "ref_logp");
  optional_input(entropy, "entropy");
  optional_input(is_weights, "is_weights");
  auto conv = [&](const at::Tensor& x) { return x.to(dtype).contiguous(); };
  t.logp = conv(logp);
  t.old_logp = conv(old_logp);
  t.adv = conv(advantages);
  t.mask = mask.contiguous();
  if (ref_logp.has_value()) t.ref = conv(*ref_logp);
  if (entropy.has_value()) t.entropy = conv(*entropy);
  if (is_weights.has_value()) t.is_w = conv(*is_weights);
  return t;
}

template <typename scalar_t>
const scalar_t* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t, typename mask_t>
cpu::LossInputs<scalar_t, mask_t> raw_inputs(const LossTensors& t) {
  return cpu::LossInputs<scalar_t, mask_t>{t.logp.data_ptr<scalar_t>(), t.old_logp.data_ptr<scalar_t>(),
                                           t.adv.data_ptr<scalar_t>(), t.mask.data_ptr<mask_t>(),
                                           opt_ptr<scalar_t>(t.ref), opt_ptr<scalar_t>(t.entropy),
                                           opt_ptr<scalar_t>(t.is_w), t.adv_per_row};
}


void raise_if_bad_mask(int64_t bad, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(bad < 0, "fastrl: `mask` must hold only 0 and 1, got ",
                    bad < 0 ? 0.0 : mask.reshape({-1})[bad].item<double>(), " at flat index ", bad);
}


#define FASTRL_LOSS_SIGNATURE                                                                        \
  const at::Tensor &logp, const at::Tensor &old_logp, const at::Tensor &advantages,                  \
      const at::Tensor &mask, const c10::optional<at::Tensor>&ref_logp,                              \
      const c10::optional<at::Tensor>&entropy, const c10::optional<at::Tensor>&is_weights,           \
      const c10::optional<at::Tensor>&cu_seqlens, c10::string_view kind, c10::string_view ratio_level, \
      double clip_low, double clip_high, c10::optional<double> dual_clip,                            \
      c10::optional<double> log_ratio_clamp, c10::optional<double> delta, double tau_pos,            \
      double tau_neg, double kl_coef, c10::string_view kl_kind, double entropy_coef,                 \
      c10::string_view agg, double horizon, double scale, c10::optional<double> num_tokens,          \
      c10::optional<double> num_seqs, const c10::optional<at::Tensor>&counts
#define FASTRL_LOSS_PREPARE                                                                           \
  const losses::Params p = make_params(kind, ratio_level, clip_low, clip_high, dual_clip,             \
                                       log_ratio_clamp, delta, tau_pos, tau_neg, kl_coef, kl_kind,    \
                                       entropy_coef, ref_logp.has_value());                           \
  const losses::FinishParams f = make_finish(p, agg, horizon, scale, num_tokens, num_seqs);           \
  const LossTensors t = prepare(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens); \
  const at::Tensor count_values = prepare_counts(counts, logp);

losses::FinishParams make_finish(const losses::Params& p, c10::string_view agg, double horizon, double scale,
                                 c10::optional<double> num_tokens, c10::optional<double> num_seqs) {
  losses::FinishParams f;
  f.agg = parse_agg(std::string(agg));
  f.geo_mean = p.kind == Kind::kGeoMean;
  f.horizon = horizon;
  f.scale = scale;
  f.num_tokens = num_tokens.value_or(NAN);
  f.num_seqs = num_seqs.value_or(NAN);
  return f;
}

// The caller's [3] float64 counts (N, S, B; NaN: not given) on logp's device, or an undefined tensor.
at::Tensor prepare_counts(const c10::optional<at::Tensor>& counts, const at::Tensor& logp) {
  if (!counts.has_value()) return at::Tensor();
  check_dtype(*counts, "counts", at::kDouble);
  check_same_device(*counts, "counts", logp, "logp");
  TORCH_CHECK(counts->dim() == 1 && counts->size(0) == 3, "fastrl: `counts` must have shape [3] (N, S, B), got ",
              counts->sizes());
  return counts->contiguous();
}

// (loss: 0-dim, float64 for float64 logp else float32; metrics: float32 [kNumMetrics]; rows
// [B, kNumStats] fp64; dlogp and dlogp_aux: logp's shape in the accumulation dtype -- float64 for
// float64 inputs, else float32 --, dlogp_aux [0] without ref_logp).
struct ForwardOutputs {
  at::Tensor loss, metrics, rows, dpol, daux;
};

ForwardOutputs forward_outputs(const LossTensors& t, const at::Tensor& logp) {
  const auto acc = t.logp.options().dtype(t.logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  ForwardOutputs o;
  o.loss = at::empty({}, t.logp.options().dtype(logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  o.metrics = at::empty({losses::kNumMetrics}, t.logp.options().dtype(at::kFloat));
  o.rows = at::empty({t.rows.num_rows, losses::kNumStats}, t.logp.options().dtype(at::kDouble));
  o.dpol = empty_streaming_output(t.logp.sizes(), acc);
  o.daux = t.ref.defined() ? empty_streaming_output(t.logp.sizes(), acc) : at::empty({0}, acc);
  return o;
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult policy_loss_rows_cpu(FASTRL_LOSS_SIGNATURE) {
  FASTRL_LOSS_PREPARE
  ForwardOutputs o = forward_outputs(t, logp);
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.logp.scalar_type(), "fastrl::policy_loss_rows", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_MASK(t.mask.scalar_type(), [&] {
      bad = cpu::policy_loss_rows<scalar_t, mask_t, acc_t>(
          raw_inputs<scalar_t, mask_t>(t), t.rows, p, o.rows.data_ptr<double>(), o.dpol.data_ptr<acc_t>(),
          t.ref.defined() ? o.daux.data_ptr<acc_t>() : nullptr);
    });
  });
  raise_if_bad_mask(bad, t.mask);
  const double loss = cpu::policy_loss_finish(o.rows.data_ptr<double>(), t.rows.num_rows, f,
                                              count_values.defined() ? count_values.data_ptr<double>() : nullptr,
                                              o.metrics.data_ptr<float>());
  if (o.loss.scalar_type() == at::kDouble) {
    *o.loss.data_ptr<double>() = loss;
  } else {
    *o.loss.data_ptr<float>() = static_cast<float>(loss);
  }
  return {o.loss, o.metrics, o.rows, o.dpol, o.daux};
}

// Validated backward inputs: layout from mask (+ cu_seqlens), the forward's outputs.
struct BackwardInputs {
  at::Tensor rows, dpol, daux, mask;
  cpu::Rows layout;
};

BackwardInputs prepare_backward(const at::Tensor& grad_loss, const at::Tensor& rows, const at::Tensor& dlogp,
                                const at::Tensor& dlogp_aux, const at::Tensor& mask,
                                const c10::optional<at::Tensor>& cu_seqlens) {
  BackwardInputs b;
  check_mask_dtype(mask);
  b.layout = cu_seqlens.has_value() ? cpu::Rows{cu_seqlens->data_ptr<int64_t>(), cu_seqlens->size(0) - 1, 0}
                                    : cpu::Rows{nullptr, mask.dim() == 2 ? mask.size(0) : 0,
                                                mask.dim() == 2 ? mask.size(1) : 0};
  TORCH_CHECK(cu_seqlens.has_value() ? mask.dim() == 1 : mask.dim() == 2, "fastrl: `mask` must be ",
              cu_seqlens.has_value() ? "1-D (packed)" : "2-D (padded)", ", got shape ", mask.sizes());
  const bool grad_float = grad_loss.scalar_type() == at::kFloat || grad_loss.scalar_type() == at::kDouble;
  TORCH_CHECK(grad_loss.dim() == 0 && grad_float,
              "fastrl: `grad_loss` must be a 0-dim float32/float64 tensor, got ", grad_loss.scalar_type(), " ",
              grad_loss.sizes());
  check_same_device(grad_loss, "grad_loss", dlogp, "dlogp");
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == b.layout.num_rows && rows.size(1) == losses::kNumStats &&
                  rows.scalar_type() == at::kDouble,
              "fastrl: `rows` must be float64 [", b.layout.num_rows, ", ", int(losses::kNumStats), "], got ",
              rows.scalar_type(), " ", rows.sizes());
  TORCH_CHECK(dlogp.sizes() == mask.sizes() && (dlogp.scalar_type() == at::kFloat || dlogp.scalar_type() == at::kDouble),
              "fastrl: `dlogp` must be float32/float64 with `mask`'s shape ", mask.sizes(), ", got ",
              dlogp.scalar_type(), " ", dlogp.sizes());
  TORCH_CHECK(dlogp_aux.numel() == 0 || (dlogp_aux.sizes() == mask.sizes() &&
                                         dlogp_aux.scalar_type() == dlogp.scalar_type()),
              "fastrl: `dlogp_aux` must be empty or like `dlogp`, got ", dlogp_aux.scalar_type(), " ",
              dlogp_aux.sizes());
  b.rows = rows.contiguous();
  b.dpol = dlogp.contiguous();
  b.daux = dlogp_aux.contiguous();
  b.mask = mask.contiguous();
  return b;
}

#define FASTRL_BACKWARD_SIGNATURE                                                                    \
  const at::Tensor &grad_loss, const at::Tensor &rows, const at::Tensor &dlogp,                      \
      const at::Tensor &dlogp_aux, const at::Tensor &mask, const c10::optional<at::Tensor>&cu_seqlens, \
      double scale, double entropy_coef, at::ScalarType logp_dtype, c10::optional<at::ScalarType> entropy_dtype

// The gradients in the inputs' dtypes (a cast only for inputs below the accumulation dtype).
std::tuple<at::Tensor, at::Tensor> in_input_dtypes(const at::Tensor& grad_logp, const at::Tensor& grad_ent,
                                                   at::ScalarType logp_dtype,
                                                   c10::optional<at::ScalarType> entropy_dtype) {
  return {grad_logp.scalar_type() == logp_dtype ? grad_logp : grad_logp.to(logp_dtype),
          !entropy_dtype.has_value() || grad_ent.scalar_type() == *entropy_dtype ? grad_ent
                                                                                 : grad_ent.to(*entropy_dtype)};
}

// (grad_logp: logp_dtype, dlogp's shape; grad_entropy: entropy_dtype, the same shape, or [0] without entropy).
std::tuple<at::Tensor, at::Tensor> policy_loss_rows_backward_cpu(FASTRL_BACKWARD_SIGNATURE) {
  const BackwardInputs b = prepare_backward(grad_loss, rows, dlogp, dlogp_aux, mask, cu_seqlens);
  const bool with_entropy = entropy_dtype.has_value();
  const double g = (grad_loss.scalar_type() == at::kDouble ? *grad_loss.data_ptr<double>()
                                                           : static_cast<double>(*grad_loss.data_ptr<float>())) *
                   scale;
  at::Tensor grad_logp = empty_streaming_output(b.dpol.sizes(), b.dpol.options());
  at::Tensor grad_ent = with_entropy ? empty_streaming_output(b.dpol.sizes(), b.dpol.options())
                                     : at::empty({0}, b.dpol.options());
  AT_DISPATCH_FLOATING_TYPES(b.dpol.scalar_type(), "fastrl::policy_loss_rows_backward", [&] {
    FASTRL_DISPATCH_MASK(b.mask.scalar_type(), [&] {
      cpu::policy_loss_rows_grad<mask_t, scalar_t>(
          b.mask.data_ptr<mask_t>(), b.layout, g, b.rows.data_ptr<double>(), b.dpol.data_ptr<scalar_t>(),
          b.daux.numel() ? b.daux.data_ptr<scalar_t>() : nullptr, entropy_coef, grad_logp.data_ptr<scalar_t>(),
          with_entropy ? grad_ent.data_ptr<scalar_t>() : nullptr);
    });
  });
  return in_input_dtypes(grad_logp, grad_ent, logp_dtype, entropy_dtype);
}

#ifdef FASTRL_WITH_CUDA
template <typename scalar_t>
cuda::LossPtrs<typename CudaScalar<scalar_t>::type> cuda_ptrs(const LossTensors& t) {
  using T = typename CudaScalar<scalar_t>::type;
  auto ptr = [](const at::Tensor& x) {
    return x.defined() ? reinterpret_cast<const T*>(x.data_ptr<scalar_t>()) : nullptr;
  };
  return cuda::LossPtrs<T>{ptr(t.logp), ptr(t.old_logp), ptr(t.adv), ptr(t.ref), ptr(t.entropy), ptr(t.is_w),
                           t.adv_per_row};
}

// Mask values and cu_seqlens are not checked on CUDA (no host sync): a nonzero mask counts as 1.
// One launch (rows, then the finish in the last block), after a 4-byte memset of its ticket counter.
ForwardResult policy_loss_rows_cuda(FASTRL_LOSS_SIGNATURE) {
  FASTRL_LOSS_PREPARE
  const c10::cuda::CUDAGuard guard(t.logp.device());
  ForwardOutputs o = forward_outputs(t, logp);
  at::Tensor ticket = at::empty({1}, t.logp.options().dtype(at::kInt));
  unsigned* done = reinterpret_cast<unsigned*>(ticket.data_ptr<int32_t>());
  const cudaStream_t stream = stream_of(t.logp);
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.logp.scalar_type(), "fastrl::policy_loss_rows", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_MASK(t.mask.scalar_type(), [&] {
      err = cuda::launch_policy_loss(cuda_ptrs<scalar_t>(t), t.mask.data_ptr<mask_t>(), t.rows.cu_seqlens,
                                     t.rows.num_rows, t.rows.row_len, p, f,
                                     count_values.defined() ? count_values.data_ptr<double>() : nullptr,
                                     o.rows.data_ptr<double>(), o.dpol.data_ptr<acc_t>(),
                                     t.ref.defined() ? o.daux.data_ptr<acc_t>() : nullptr, o.loss.data_ptr(),
                                     o.loss.scalar_type() == at::kDouble, o.metrics.data_ptr<float>(), done,
                                     stream);
    });
  });
  C10_CUDA_CHECK(err);
  return {o.loss, o.metrics, o.rows, o.dpol, o.daux};
}

std::tuple<at::Tensor, at::Tensor> policy_loss_rows_backward_cuda(FASTRL_BACKWARD_SIGNATURE) {
  const BackwardInputs b = prepare_backward(grad_loss, rows, dlogp, dlogp_aux, mask, cu_seqlens);
  const c10::cuda::CUDAGuard guard(b.dpol.device());
  const bool with_entropy = entropy_dtype.has_value();
  at::Tensor grad_logp = at::empty(b.dpol.sizes(), b.dpol.options());
  at::Tensor grad_ent = at::empty(with_entropy ? b.dpol.sizes() : at::IntArrayRef{0}, b.dpol.options());
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(b.dpol.scalar_type(), "fastrl::policy_loss_rows_backward", [&] {
    FASTRL_DISPATCH_MASK(b.mask.scalar_type(), [&] {
      err = cuda::launch_policy_loss_rows_grad(
          b.mask.data_ptr<mask_t>(), b.layout.cu_seqlens, b.layout.num_rows, b.layout.row_len, grad_loss.data_ptr(),
          grad_loss.scalar_type() == at::kDouble, scale, b.rows.data_ptr<double>(), b.dpol.data_ptr<scalar_t>(),
          b.daux.numel() ? b.daux.data_ptr<scalar_t>() : nullptr, entropy_coef, grad_logp.data_ptr<scalar_t>(),
          with_entropy ? grad_ent.data_ptr<scalar_t>() : nullptr, stream_of(b.dpol));
    });
  });
  C10_CUDA_CHECK(err);
  return in_input_dtypes(grad_logp, grad_ent, logp_dtype, entropy_dtype);
}
#endif

}  // namespace

#define FASTRL_LOSS_SCHEMA_ARGS                                                                       \
  "Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, Tensor? entropy, " \
  "Tensor? is_weights, Tensor? cu_seqlens, str kind, str ratio_level, float clip_low, "               \
  "float clip_high, float? dual_clip, float? log_ratio_clamp, float? delta, float tau_pos, "          \
  "float tau_neg, float kl_coef, str kl_kind, float entropy_coef, str agg, float horizon, float scale, "   \
  "float? num_tokens, float? num_seqs, Tensor? counts"

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def("policy_loss_rows(" FASTRL_LOSS_SCHEMA_ARGS
        ") -> (Tensor loss, Tensor metrics, Tensor rows, Tensor dlogp, Tensor dlogp_aux)");
  m.def(
      "policy_loss_rows_backward(Tensor grad_loss, Tensor rows, Tensor dlogp, Tensor dlogp_aux, Tensor mask, "
      "Tensor? cu_seqlens, float scale, float entropy_coef, ScalarType logp_dtype, ScalarType? entropy_dtype) -> "
      "(Tensor grad_logp, Tensor grad_entropy)");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("policy_loss_rows", &policy_loss_rows_cpu);
  m.impl("policy_loss_rows_backward", &policy_loss_rows_backward_cpu);
}

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) {
  m.impl("policy_loss_rows", &policy_loss_rows_cuda);
  m.impl("policy_loss_rows_backward", &policy_loss_rows_backward_cuda);
}
#endif

}  // namespace fastrl
