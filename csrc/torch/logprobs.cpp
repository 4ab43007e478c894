// torch bindings of the log-prob family: schemas, input checks, CPU/CUDA dispatch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu/logprobs.h"
#include "torch/checks.h"
#include "torch/memory.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/logprobs.cuh"
#endif

namespace fastrl {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// logits [N, V] with unit stride along V (copied if not), labels int64 [N] (one label per row) or
// [N, K] (K labels per row, e.g. top-K candidates; the log-probs then have shape [N, K]).
struct Prepared {
  at::Tensor logits, labels;
  int64_t rows, vocab, row_stride, num_labels;
  float inv_t;
};

Prepared prepare(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  check_dim(logits, "logits", 2);
  check_floating(logits, "logits");
  TORCH_CHECK(labels.dim() == 1 || labels.dim() == 2, "fastrl: `labels` must be 1-D [N] or 2-D [N, K], got shape ",
              labels.sizes());
  check_dtype(labels, "labels", at::kLong);
  check_same_size0(labels, "labels", logits, "logits");
  check_same_device(labels, "labels", logits, "logits");
  TORCH_CHECK(logits.size(1) >= 1, "fastrl: `logits` must have a vocabulary dimension of size >= 1, "
              "got shape ", logits.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastrl: `temperature` must be a finite number > 0, got ", temperature);
  Prepared p;
  p.logits = logits.stride(1) == 1 ? logits : logits.contiguous();
  p.labels = labels.contiguous();
  p.rows = logits.size(0);
  p.vocab = logits.size(1);
  p.num_labels = labels.dim() == 2 ? labels.size(1) : 1;
  p.row_stride = p.rows > 1 ? p.logits.stride(0) : p.vocab;
  p.inv_t = static_cast<float>(1.0 / temperature);
  return p;
}

void check_row_vector(const at::Tensor& t, const char* name, const Prepared& p) {
  check_dim(t, name, 1);
  check_dtype(t, name, at::kFloat);
  TORCH_CHECK(t.size(0) == p.rows, "fastrl: `", name, "` has ", t.size(0), " entries but `logits` has ",
              p.rows, " rows");
  check_same_device(t, name, p.logits, "logits");
}

// An optional fp32 [N] tensor, checked and made contiguous (undefined if absent).
at::Tensor optional_row_vector(const c10::optional<at::Tensor>& t, const char* name, const Prepared& p) {
  if (!t.has_value()) return at::Tensor();
  check_row_vector(*t, name, p);
  return t->contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

Outputs allocate(const Prepared& p, bool compute_entropy) {
  const auto f32 = p.logits.options().dtype(at::kFloat);
  return {at::empty(p.labels.sizes(), f32), at::empty({compute_entropy ? p.rows : 0}, f32),
          at::empty({p.rows}, f32)};
}

[[noreturn]] void bad_label(const Prepared& p, int64_t index, int64_t ignore_index) {
  TORCH_CHECK(false, "fastrl: `labels` must lie in [0, vocab=", p.vocab, ") or equal ignore_index=",
              ignore_index, ", got labels[", index, "] = ", p.labels.view(-1)[index].item<int64_t>(),
              " (position in the flattened `labels`)");
}

struct BackwardArgs {
  at::Tensor lse, entropy, g_lp, g_ent, g_lse;
};

BackwardArgs prepare_backward(const Prepared& p, const at::Tensor& lse,
                              const c10::optional<at::Tensor>& entropy,
                              const c10::optional<at::Tensor>& grad_logprobs,
                              const c10::optional<at::Tensor>& grad_entropy,
                              const c10::optional<at::Tensor>& grad_lse) {
  BackwardArgs a;
  check_row_vector(lse, "lse", p);
  a.lse = lse.contiguous();
  if (grad_logprobs.has_value()) {
    check_dtype(*grad_logprobs, "grad_logprobs", at::kFloat);
    TORCH_CHECK(grad_logprobs->sizes() == p.labels.sizes(), "fastrl: `grad_logprobs` must have the shape of `labels` ",
                p.labels.sizes(), ", got ", grad_logprobs->sizes());
    check_same_device(*grad_logprobs, "grad_logprobs", p.logits, "logits");
    a.g_lp = grad_logprobs->contiguous();
  }
  a.g_ent = optional_row_vector(grad_entropy, "grad_entropy", p);
  a.g_lse = optional_row_vector(grad_lse, "grad_lse", p);
  if (a.g_ent.defined()) {
    TORCH_CHECK(entropy.has_value(), "fastrl: `grad_entropy` needs the forward's `entropy`");
    a.entropy = optional_row_vector(entropy, "entropy", p);
  }
  return a;
}

Outputs logprobs_cpu(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                     int64_t ignore_index, bool compute_entropy) {
  const Prepared p = prepare(logits, labels, temperature);
  Outputs out = allocate(p, compute_entropy);
  float* ent = compute_entropy ? std::get<1>(out).data_ptr<float>() : nullptr;
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastrl::logprobs", [&] {
    bad = cpu::logprobs_forward<scalar_t>(p.logits.data_ptr<scalar_t>(), p.row_stride,
                                          p.labels.data_ptr<int64_t>(), p.rows, p.num_labels, p.vocab, p.inv_t,
                                          ignore_index, std::get<0>(out).data_ptr<float>(), ent,
                                          std::get<2>(out).data_ptr<float>());
  });
  if (bad >= 0) bad_label(p, bad, ignore_index);
  return out;
}

// Writes the gradient into `grad` (a new [N, V] buffer, or p.logits itself for the in-place op).
void run_backward_cpu(const Prepared& p, const BackwardArgs& a, const at::Tensor& grad,
                      int64_t grad_row_stride, int64_t ignore_index) {
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastrl::logprobs_backward", [&] {
    bad = cpu::logprobs_backward<scalar_t>(
        p.logits.data_ptr<scalar_t>(), p.row_stride, p.labels.data_ptr<int64_t>(), p.rows, p.num_labels,
        p.vocab, p.inv_t, ignore_index, a.lse.data_ptr<float>(), ptr_or_null(a.entropy), ptr_or_null(a.g_lp),
        ptr_or_null(a.g_ent), ptr_or_null(a.g_lse), grad.data_ptr<scalar_t>(), grad_row_stride);
  });
  if (bad >= 0) bad_label(p, bad, ignore_index);
}

// The in-place op overwrites `logits` itself: it must already have unit stride along V (no copy).
Prepared prepare_inplace(const at::Tensor& logits, const at::Tensor& labels, double temperature) {
  if (logits.dim() == 2) {
    TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "fastrl: in-place backward needs `logits` with unit "
                "stride along the vocabulary (it overwrites them with the gradient), got strides ", logits.strides());
  }
  return prepare(logits, labels, temperature);
}

#ifdef FASTRL_WITH_CUDA
// Same math as the CPU op (fp32 online softmax state), reduced in a fixed order per row: bitwise
// reproducible run to run and batch invariant, equal to the CPU results up to fp32 rounding. A
// label outside [0, vocab) (not ignore_index) is not raised (that would need a host sync): its
// log-prob is NaN and its row gets no log-prob gradient.
Outputs logprobs_cuda(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                      int64_t ignore_index, bool compute_entropy) {
  const Prepared p = prepare(logits, labels, temperature);
  const c10::cuda::CUDAGuard guard(p.logits.device());
  Outputs out = allocate(p, compute_entropy);
  float* ent = compute_entropy ? std::get<1>(out).data_ptr<float>() : nullptr;
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastrl::logprobs", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_logprobs_forward<cuda_t>(
        reinterpret_cast<const cuda_t*>(p.logits.data_ptr<scalar_t>()), p.row_stride,
        p.labels.data_ptr<int64_t>(), p.rows, p.num_labels, p.vocab, p.inv_t, ignore_index,
        std::get<0>(out).data_ptr<float>(), ent, std::get<2>(out).data_ptr<float>(), stream_of(p.logits));
  });
  C10_CUDA_CHECK(err);
  return out;
}

void run_backward_cuda(const Prepared& p, const BackwardArgs& a, const at::Tensor& grad,
                       int64_t grad_row_stride, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(p.logits.device());
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.logits.scalar_type(), "fastrl::logprobs_backward", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_logprobs_backward<cuda_t>(
        reinterpret_cast<const cuda_t*>(p.logits.data_ptr<scalar_t>()), p.row_stride,
        p.labels.data_ptr<int64_t>(), p.rows, p.num_labels, p.vocab, p.inv_t, ignore_index,
        a.lse.data_ptr<float>(), ptr_or_null(a.entropy), ptr_or_null(a.g_lp), ptr_or_null(a.g_ent),
        ptr_or_null(a.g_lse), reinterpret_cast<cuda_t*>(grad.data_ptr<scalar_t>()), grad_row_stride,
        stream_of(p.logits));
  });
  C10_CUDA_CHECK(err);
}

#endif

// The backward ops for one device, given its kernel runner (run_backward_cpu / run_backward_cuda).
using BackwardRunner = void (*)(const Prepared&, const BackwardArgs&, const at::Tensor&, int64_t, int64_t);

template <BackwardRunner run>
at::Tensor logprobs_backward_impl(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const c10::optional<at::Tensor>& entropy,
                                  const c10::optional<at::Tensor>& grad_logprobs,
                                  const c10::optional<at::Tensor>& grad_entropy,
                                  const c10::optional<at::Tensor>& grad_lse, double temperature,
                                  int64_t ignore_index) {
  const Prepared p = prepare(logits, labels, temperature);
  const BackwardArgs a = prepare_backward(p, lse, entropy, grad_logprobs, grad_entropy, grad_lse);
  at::Tensor grad = empty_streaming_output({p.rows, p.vocab}, p.logits.options());  // CPU: huge pages
  run(p, a, grad, p.vocab, ignore_index);
  return grad;
}

template <BackwardRunner run>
void logprobs_backward_inplace_impl(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                    const c10::optional<at::Tensor>& entropy,
                                    const c10::optional<at::Tensor>& grad_logprobs,
                                    const c10::optional<at::Tensor>& grad_entropy,
                                    const c10::optional<at::Tensor>& grad_lse, double temperature,
                                    int64_t ignore_index) {
  const Prepared p = prepare_inplace(logits, labels, temperature);
  const BackwardArgs a = prepare_backward(p, lse, entropy, grad_logprobs, grad_entropy, grad_lse);
  run(p, a, p.logits, p.row_stride, ignore_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def(
      "logprobs(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool compute_entropy) -> (Tensor logprobs, Tensor entropy, Tensor lse)");
  m.def(
      "logprobs_backward(Tensor logits, Tensor labels, Tensor lse, Tensor? entropy, "
      "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, float temperature, "
      "int ignore_index) -> Tensor");
  // The gradient written into `logits` itself (flash-attn's inplace_backward): peak memory = the logits.
  m.def(
      "logprobs_backward_(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor? entropy, "
      "Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, float temperature, "
      "int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("logprobs", &logprobs_cpu);
  m.impl("logprobs_backward", &logprobs_backward_impl<run_backward_cpu>);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_impl<run_backward_cpu>);
}

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) {
  m.impl("logprobs", &logprobs_cuda);
  m.impl("logprobs_backward", &logprobs_backward_impl<run_backward_cuda>);
  m.impl("logprobs_backward_", &logprobs_backward_inplace_impl<run_backward_cuda>);
}
#endif

}  // namespace fastrl
