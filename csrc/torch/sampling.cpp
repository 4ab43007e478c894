// torch bindings of token sampling: schema, input checks, CPU/CUDA dispatch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu/sampling.h"
#include "torch/checks.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/sampling.cuh"
#endif

namespace fastrl {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct Prepared {
  at::Tensor logits, uniforms, temperature, top_k, top_p, min_p;  // the per-row ones may be undefined
  int64_t rows, vocab, row_stride;
  sampling::ParamSource params;
};

// An optional per-row parameter: 1-D, `dtype`, one entry per row, on the logits' device.
at::Tensor row_param(const c10::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
                     const at::Tensor& logits) {
  if (!t.has_value()) return at::Tensor();
  check_dim(*t, name, 1);
  check_dtype(*t, name, dtype);
  check_same_size0(*t, name, logits, "logits");
  check_same_device(*t, name, logits, "logits");
  return t->contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

Prepared prepare(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                 double top_p, double min_p, const c10::optional<at::Tensor>& temperature_rows,
                 const c10::optional<at::Tensor>& top_k_rows, const c10::optional<at::Tensor>& top_p_rows,
                 const c10::optional<at::Tensor>& min_p_rows) {
  check_dim(logits, "logits", 2);
  check_floating(logits, "logits");
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(1) <= sampling::kMaxVocab,
              "fastrl: `logits` must have a vocabulary dimension of size in [1, ", sampling::kMaxVocab,
              "], got shape ", logits.sizes());
  check_dim(uniforms, "uniforms", 1);
  check_dtype(uniforms, "uniforms", at::kDouble);
  check_same_size0(uniforms, "uniforms", logits, "logits");
  check_same_device(uniforms, "uniforms", logits, "logits");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastrl: `temperature` must be a finite number > 0 (greedy decoding is top_k=1), got ", temperature);
  TORCH_CHECK(top_k >= 1, "fastrl: `top_k` must be >= 1, got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "fastrl: `top_p` must be in (0, 1], got ", top_p);
  TORCH_CHECK(min_p >= 0.0 && min_p <= 1.0, "fastrl: `min_p` must be in [0, 1], got ", min_p);
  Prepared p;
  p.logits = logits.stride(1) == 1 ? logits : logits.contiguous();
  p.uniforms = uniforms.contiguous();
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.row_stride = p.rows > 1 ? p.logits.stride(0) : p.vocab;
  p.temperature = row_param(temperature_rows, "temperature", at::kDouble, logits);
  p.top_k = row_param(top_k_rows, "top_k", at::kLong, logits);
  p.top_p = row_param(top_p_rows, "top_p", at::kDouble, logits);
  p.min_p = row_param(min_p_rows, "min_p", at::kDouble, logits);
  p.params = {ptr_or_null<double>(p.temperature), ptr_or_null<int64_t>(p.top_k), ptr_or_null<double>(p.top_p),
              ptr_or_null<double>(p.min_p), temperature, top_k, top_p, min_p};
  return p;
}

// The first entry of a per-row parameter outside its range, as an error naming it (CPU only: on
// CUDA this would be a host sync; the kernel gives such rows token -1 instead).
void check_row_values(const at::Tensor& t, const char* name, const at::Tensor& bad, const char* expected) {
  if (!t.defined()) return;
  const at::Tensor idx = bad.nonzero();
  if (idx.numel() == 0) return;
  const int64_t r = idx[0][0].item<int64_t>();
  TORCH_CHECK(false, "fastrl: `", name, "` must be ", expected, ", got ", name, "[", r, "] = ", t[r].item<double>());
}

void check_row_params_cpu(const Prepared& p) {
  const auto& T = p.temperature;
  if (T.defined()) check_row_values(T, "temperature", ~(T.gt(0.0) & T.isfinite()), "finite and > 0");
  if (p.top_k.defined()) check_row_values(p.top_k, "top_k", p.top_k.lt(1), ">= 1");
  if (p.top_p.defined()) check_row_values(p.top_p, "top_p", ~(p.top_p.gt(0.0) & p.top_p.le(1.0)), "in (0, 1]");
  if (p.min_p.defined()) check_row_values(p.min_p, "min_p", ~(p.min_p.ge(0.0) & p.min_p.le(1.0)), "in [0, 1]");
}

Outputs allocate(const Prepared& p) {
  return {at::empty({p.rows}, p.logits.options().dtype(at::kLong)),
          at::empty({p.rows}, p.logits.options().dtype(at::kFloat)),
          at::empty({p.rows}, p.logits.options().dtype(at::kFloat))};
}

Outputs sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                   double top_p, double min_p, const c10::optional<at::Tensor>& temperature_rows,
                   const c10::optional<at::Tensor>& top_k_rows, const c10::optional<at::Tensor>& top_p_rows,
                   const c10::optional<at::Tensor>& min_p_rows) {
  const Prepared p = prepare(logits, uniforms, temperature, top_k, top_p, min_p, temperature_rows, top_k_rows,
                             top_p_rows, min_p_rows);
  check_row_params_cpu(p);
  Outputs out = allocate(p);
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastrl::sample_tokens", [&] {
    bad = cpu::sample_tokens<scalar_t>(p.logits.data_ptr<scalar_t>(), p.row_stride, p.rows, p.vocab,
                                       p.uniforms.data_ptr<double>(), p.params, std::get<0>(out).data_ptr<int64_t>(),
                                       std::get<1>(out).data_ptr<float>(), std::get<2>(out).data_ptr<float>());
  });
  TORCH_CHECK(bad < 0, "fastrl: `logits` row ", bad, " cannot be sampled: it holds a NaN or +inf logit (after "
              "scaling by 1/temperature) or only -inf logits");
  return out;
}

#ifdef FASTRL_WITH_CUDA
// Same kept set and tokens as the CPU op given the same uniforms (up to expf rounding; masses are
// exact integers). No host sync: a row that cannot be sampled, or whose per-row parameters are out
// of range, gets token -1 and NaN log-probs instead of an error.
Outputs sample_cuda(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                    double top_p, double min_p, const c10::optional<at::Tensor>& temperature_rows,
                    const c10::optional<at::Tensor>& top_k_rows, const c10::optional<at::Tensor>& top_p_rows,
                    const c10::optional<at::Tensor>& min_p_rows) {
  const Prepared p = prepare(logits, uniforms, temperature, top_k, top_p, min_p, temperature_rows, top_k_rows,
                             top_p_rows, min_p_rows);
  const c10::cuda::CUDAGuard guard(p.logits.device());
  Outputs out = allocate(p);
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastrl::sample_tokens", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_sample_tokens<cuda_t>(
        reinterpret_cast<const cuda_t*>(p.logits.data_ptr<scalar_t>()), p.row_stride, p.rows, p.vocab,
        p.uniforms.data_ptr<double>(), p.params, std::get<0>(out).data_ptr<int64_t>(),
        std::get<1>(out).data_ptr<float>(), std::get<2>(out).data_ptr<float>(), stream_of(p.logits));
  });
  C10_CUDA_CHECK(err);
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def(
      "sample_tokens(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p, float min_p, "
      "Tensor? temperature_rows, Tensor? top_k_rows, Tensor? top_p_rows, Tensor? min_p_rows) "
      "-> (Tensor tokens, Tensor logprobs, Tensor raw_logprobs)");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) { m.impl("sample_tokens", &sample_cpu); }

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) { m.impl("sample_tokens", &sample_cuda); }
#endif

}  // namespace fastrl
