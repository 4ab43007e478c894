// torch bindings of the fused policy-loss family: schemas, checks, dispatch.
//   policy_loss_rows           per-row fp64 statistics of a policy loss (+ KL + entropy terms) and
//                              its metrics, and each token's derivatives, one pass (fastrl/losses.h)
//   policy_loss_rows_backward  d loss / d logp and d loss / d entropy from d loss / d rows: one
//                              streaming pass over the saved derivatives
// The scalar loss is a linear combination of the rows chosen by the aggregation mode, computed
// by python/fastrl/losses.py on [B] tensors (so a process group can all-reduce the counts first).
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

Kind parse_kind(const std::string& s) {
  if (s == "vanilla") return Kind::kVanilla;
  if (s == "gpg") return Kind::kGpg;
  if (s == "cispo") return Kind::kCispo;
  if (s == "gspo") return Kind::kGspo;
  if (s == "sapo") return Kind::kSapo;
  if (s == "geo_mean") return Kind::kGeoMean;
  TORCH_CHECK_VALUE(false, "fastrl: policy_loss `kind` must be one of 'vanilla', 'gpg', 'cispo', 'gspo', "
                    "'sapo', 'geo_mean'; got '", s, "'");
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
  TORCH_CHECK_VALUE(clip_low > 0.0 && clip_low <= 1.0, "fastrl: policy_loss `clip_low` must lie in (0, 1] "
                    "(the ratio is clipped below at 1 - clip_low), got ", clip_low);
  TORCH_CHECK_VALUE(clip_high > 0.0 && std::isfinite(clip_high), "fastrl: policy_loss `clip_high` must be "
                    "> 0 and finite, got ", clip_high);
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
    const at::Tensor& cu = *cu_seqlens;
    check_dim(logp, "logp", 1);
    check_dim(cu, "cu_seqlens", 1);
    check_dtype(cu, "cu_seqlens", at::kLong);
    check_same_device(cu, "cu_seqlens", logp, "logp");
    TORCH_CHECK(cu.size(0) >= 1 && cu.is_contiguous(),
                "fastrl: `cu_seqlens` must be a contiguous int64 tensor of B + 1 >= 1 offsets");
    const int64_t num_rows = cu.size(0) - 1, n = logp.size(0);
    if (cu.device().is_cpu()) {  // on CUDA trusted (checking needs a host sync)
      const int64_t* c = cu.data_ptr<int64_t>();
      bool ok = c[0] == 0 && c[num_rows] == n;
      for (int64_t b = 0; ok && b < num_rows; ++b) ok = c[b + 1] >= c[b];
      TORCH_CHECK(ok, "fastrl: `cu_seqlens` must start at 0, be non-decreasing and end at the number of "
                  "tokens N = ", n, "; got ", cu);
    }
    t.rows = cpu::Rows{cu.data_ptr<int64_t>(), num_rows, 0};
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
      double tau_neg, double kl_coef, c10::string_view kl_kind, double entropy_coef
#define FASTRL_LOSS_PREPARE                                                                           \
  const losses::Params p = make_params(kind, ratio_level, clip_low, clip_high, dual_clip,             \
                                       log_ratio_clamp, delta, tau_pos, tau_neg, kl_coef, kl_kind,    \
                                       entropy_coef, ref_logp.has_value());                           \
  const LossTensors t = prepare(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens);

// (rows [B, kNumStats] fp64, dlogp and dlogp_aux: logp's shape in the accumulation dtype -- float64
// for float64 inputs, else float32 -- dlogp_aux [0] without ref_logp).
struct ForwardOutputs {
  at::Tensor rows, dpol, daux;
};

ForwardOutputs forward_outputs(const LossTensors& t) {
  const auto acc = t.logp.options().dtype(t.logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  ForwardOutputs o;
  o.rows = at::empty({t.rows.num_rows, losses::kNumStats}, t.logp.options().dtype(at::kDouble));
  o.dpol = empty_streaming_output(t.logp.sizes(), acc);
  o.daux = t.ref.defined() ? empty_streaming_output(t.logp.sizes(), acc) : at::empty({0}, acc);
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_rows_cpu(FASTRL_LOSS_SIGNATURE) {
  FASTRL_LOSS_PREPARE
  ForwardOutputs o = forward_outputs(t);
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
  return {o.rows, o.dpol, o.daux};
}

// Validated backward inputs: layout from mask (+ cu_seqlens), the forward's outputs.
struct BackwardInputs {
  at::Tensor grad_rows, rows, dpol, daux, mask;
  cpu::Rows layout;
};

BackwardInputs prepare_backward(const at::Tensor& grad_rows, const at::Tensor& rows, const at::Tensor& dlogp,
                                const at::Tensor& dlogp_aux, const at::Tensor& mask,
                                const c10::optional<at::Tensor>& cu_seqlens) {
  BackwardInputs b;
  check_mask_dtype(mask);
  b.layout = cu_seqlens.has_value() ? cpu::Rows{cu_seqlens->data_ptr<int64_t>(), cu_seqlens->size(0) - 1, 0}
                                    : cpu::Rows{nullptr, mask.dim() == 2 ? mask.size(0) : 0,
                                                mask.dim() == 2 ? mask.size(1) : 0};
  TORCH_CHECK(cu_seqlens.has_value() ? mask.dim() == 1 : mask.dim() == 2, "fastrl: `mask` must be ",
              cu_seqlens.has_value() ? "1-D (packed)" : "2-D (padded)", ", got shape ", mask.sizes());
  for (const at::Tensor* x : {&grad_rows, &rows}) {
    TORCH_CHECK(x->dim() == 2 && x->size(0) == b.layout.num_rows && x->size(1) == losses::kNumStats,
                "fastrl: `grad_rows` and `rows` must have shape [", b.layout.num_rows, ", ",
                int(losses::kNumStats), "], got ", x->sizes());
  }
  TORCH_CHECK(dlogp.sizes() == mask.sizes() && (dlogp.scalar_type() == at::kFloat || dlogp.scalar_type() == at::kDouble),
              "fastrl: `dlogp` must be float32/float64 with `mask`'s shape ", mask.sizes(), ", got ",
              dlogp.scalar_type(), " ", dlogp.sizes());
  TORCH_CHECK(dlogp_aux.numel() == 0 || (dlogp_aux.sizes() == mask.sizes() &&
                                         dlogp_aux.scalar_type() == dlogp.scalar_type()),
              "fastrl: `dlogp_aux` must be empty or like `dlogp`, got ", dlogp_aux.scalar_type(), " ",
              dlogp_aux.sizes());
  b.grad_rows = grad_rows.to(at::kDouble).contiguous();
  b.rows = rows.to(at::kDouble).contiguous();
  b.dpol = dlogp.contiguous();
  b.daux = dlogp_aux.contiguous();
  b.mask = mask.contiguous();
  return b;
}

#define FASTRL_BACKWARD_SIGNATURE                                                                    \
  const at::Tensor &grad_rows, const at::Tensor &rows, const at::Tensor &dlogp,                      \
      const at::Tensor &dlogp_aux, const at::Tensor &mask, const c10::optional<at::Tensor>&cu_seqlens, \
      double entropy_coef, bool with_entropy

// (grad_logp: dlogp's dtype and shape, grad_entropy: the same, or [0] without entropy).
std::tuple<at::Tensor, at::Tensor> policy_loss_rows_backward_cpu(FASTRL_BACKWARD_SIGNATURE) {
  const BackwardInputs b = prepare_backward(grad_rows, rows, dlogp, dlogp_aux, mask, cu_seqlens);
  at::Tensor grad_logp = empty_streaming_output(b.dpol.sizes(), b.dpol.options());
  at::Tensor grad_ent = with_entropy ? empty_streaming_output(b.dpol.sizes(), b.dpol.options())
                                     : at::empty({0}, b.dpol.options());
  AT_DISPATCH_FLOATING_TYPES(b.dpol.scalar_type(), "fastrl::policy_loss_rows_backward", [&] {
    FASTRL_DISPATCH_MASK(b.mask.scalar_type(), [&] {
      cpu::policy_loss_rows_grad<mask_t, scalar_t>(
          b.mask.data_ptr<mask_t>(), b.layout, b.grad_rows.data_ptr<double>(), b.rows.data_ptr<double>(),
          b.dpol.data_ptr<scalar_t>(), b.daux.numel() ? b.daux.data_ptr<scalar_t>() : nullptr, entropy_coef,
          grad_logp.data_ptr<scalar_t>(), with_entropy ? grad_ent.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {grad_logp, grad_ent};
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
std::tuple<at::Tensor, at::Tensor, at::Tensor> policy_loss_rows_cuda(FASTRL_LOSS_SIGNATURE) {
  FASTRL_LOSS_PREPARE
  const c10::cuda::CUDAGuard guard(t.logp.device());
  ForwardOutputs o = forward_outputs(t);
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.logp.scalar_type(), "fastrl::policy_loss_rows", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    FASTRL_DISPATCH_MASK(t.mask.scalar_type(), [&] {
      err = cuda::launch_policy_loss_rows(cuda_ptrs<scalar_t>(t), t.mask.data_ptr<mask_t>(), t.rows.cu_seqlens,
                                          t.rows.num_rows, t.rows.row_len, p, o.rows.data_ptr<double>(),
                                          o.dpol.data_ptr<acc_t>(),
                                          t.ref.defined() ? o.daux.data_ptr<acc_t>() : nullptr, stream_of(t.logp));
    });
  });
  C10_CUDA_CHECK(err);
  return {o.rows, o.dpol, o.daux};
}

std::tuple<at::Tensor, at::Tensor> policy_loss_rows_backward_cuda(FASTRL_BACKWARD_SIGNATURE) {
  const BackwardInputs b = prepare_backward(grad_rows, rows, dlogp, dlogp_aux, mask, cu_seqlens);
  const c10::cuda::CUDAGuard guard(b.dpol.device());
  at::Tensor grad_logp = at::empty(b.dpol.sizes(), b.dpol.options());
  at::Tensor grad_ent = at::empty(with_entropy ? b.dpol.sizes() : at::IntArrayRef{0}, b.dpol.options());
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES(b.dpol.scalar_type(), "fastrl::policy_loss_rows_backward", [&] {
    FASTRL_DISPATCH_MASK(b.mask.scalar_type(), [&] {
      err = cuda::launch_policy_loss_rows_grad(
          b.mask.data_ptr<mask_t>(), b.layout.cu_seqlens, b.layout.num_rows, b.layout.row_len,
          b.grad_rows.data_ptr<double>(), b.rows.data_ptr<double>(), b.dpol.data_ptr<scalar_t>(),
          b.daux.numel() ? b.daux.data_ptr<scalar_t>() : nullptr, entropy_coef, grad_logp.data_ptr<scalar_t>(),
          with_entropy ? grad_ent.data_ptr<scalar_t>() : nullptr, stream_of(b.dpol));
    });
  });
  C10_CUDA_CHECK(err);
  return {grad_logp, grad_ent};
}
#endif

}  // namespace

#define FASTRL_LOSS_SCHEMA_ARGS                                                                       \
  "Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor? ref_logp, Tensor? entropy, " \
  "Tensor? is_weights, Tensor? cu_seqlens, str kind, str ratio_level, float clip_low, "               \
  "float clip_high, float? dual_clip, float? log_ratio_clamp, float? delta, float tau_pos, "          \
  "float tau_neg, float kl_coef, str kl_kind, float entropy_coef"

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def("policy_loss_rows(" FASTRL_LOSS_SCHEMA_ARGS ") -> (Tensor rows, Tensor dlogp, Tensor dlogp_aux)");
  m.def(
      "policy_loss_rows_backward(Tensor grad_rows, Tensor rows, Tensor dlogp, Tensor dlogp_aux, Tensor mask, "
      "Tensor? cu_seqlens, float entropy_coef, bool with_entropy) -> (Tensor grad_logp, Tensor grad_entropy)");
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
