// torch bindings of the group-advantage family: schemas, input checks, CPU/CUDA dispatch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/advantages.h"
#include "torch/checks.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/advantages.cuh"
#endif

namespace fastrl {
namespace {

using advantages::Baseline;
using advantages::Params;
using advantages::Scale;

Baseline parse_baseline(const std::string& s) {
  if (s == "mean") return Baseline::kMean;
  if (s == "leave_one_out") return Baseline::kLeaveOneOut;
  if (s == "weighted_mean") return Baseline::kWeightedMean;
  if (s == "none") return Baseline::kNone;
  TORCH_CHECK(false, "fastrl: `baseline` must be one of 'mean', 'leave_one_out', 'weighted_mean', "
                     "'none'; got '", s, "'");
}

Scale parse_scale(const std::string& s) {
  if (s == "group_std") return Scale::kGroupStd;
  if (s == "batch_std") return Scale::kBatchStd;
  if (s == "none") return Scale::kNone;
  TORCH_CHECK(false, "fastrl: `scale` must be one of 'group_std', 'batch_std', 'none'; got '", s, "'");
}

using AdvOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct Prepared {
  at::Tensor scores, group_ids, weights;  // contiguous; weights float64 or undefined
  Params params;
};

Prepared prepare(const at::Tensor& scores, const at::Tensor& group_ids,
                 const c10::optional<at::Tensor>& weights, int64_t num_groups,
                 const std::string& baseline, const std::string& scale, bool unbiased, double eps,
                 bool eps_on_var, bool singleton_zero, bool ignore_nan) {
  check_grouped_scores(scores, group_ids, num_groups);
  TORCH_CHECK(eps >= 0.0, "fastrl: `eps` must be >= 0, got ", eps);
  Prepared p;
  p.params.baseline = parse_baseline(baseline);
  p.params.scale = parse_scale(scale);
  p.params.unbiased = unbiased;
  p.params.eps = eps;
  p.params.eps_on_var = eps_on_var;
  p.params.singleton_zero = singleton_zero;
  p.params.ignore_nan = ignore_nan;
  TORCH_CHECK(p.params.baseline != Baseline::kWeightedMean || weights.has_value(),
              "fastrl: baseline='weighted_mean' needs `weights` (e.g. response lengths)");
  p.scores = scores.contiguous();
  p.group_ids = group_ids.contiguous();
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    check_dim(w, "weights", 1);
    check_same_size0(w, "weights", scores, "scores");
    check_same_device(w, "weights", scores, "scores");
    TORCH_CHECK(at::isFloatingType(w.scalar_type()) || at::isIntegralType(w.scalar_type(), true),
                "fastrl: `weights` must be a real tensor, got ", w.scalar_type());
    p.weights = w.to(at::kDouble).contiguous();
  }
  return p;
}

AdvOutputs allocate(const at::Tensor& scores, int64_t num_groups) {
  auto f32 = scores.options().dtype(at::kFloat);
  return {at::empty({scores.size(0)}, f32),
          at::empty({num_groups}, scores.options().dtype(at::kLong)),
          at::empty({num_groups}, f32), at::empty({num_groups}, f32),
          at::empty({num_groups}, f32), at::empty({num_groups}, f32)};
}

advantages::StatsOut stats_out(AdvOutputs& out) {
  return {std::get<1>(out).data_ptr<int64_t>(), std::get<2>(out).data_ptr<float>(),
          std::get<3>(out).data_ptr<float>(), std::get<4>(out).data_ptr<float>(),
          std::get<5>(out).data_ptr<float>()};
}

AdvOutputs group_advantages_cpu(const at::Tensor& scores, const at::Tensor& group_ids,
                                const c10::optional<at::Tensor>& weights, int64_t num_groups,
                                c10::string_view baseline, c10::string_view scale, bool unbiased,
                                double eps, bool eps_on_var, bool singleton_zero, bool ignore_nan) {
  Prepared p = prepare(scores, group_ids, weights, num_groups, std::string(baseline),
                       std::string(scale), unbiased, eps, eps_on_var, singleton_zero, ignore_nan);
  AdvOutputs out = allocate(p.scores, num_groups);
  const double* w = p.weights.defined() ? p.weights.data_ptr<double>() : nullptr;
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scores.scalar_type(),
                                  "fastrl::group_advantages", [&] {
    bad = cpu::group_advantages<scalar_t>(p.scores.data_ptr<scalar_t>(),
                                          p.group_ids.data_ptr<int64_t>(), w, p.scores.size(0),
                                          num_groups, p.params, std::get<0>(out).data_ptr<float>(),
                                          stats_out(out));
  });
  TORCH_CHECK(bad < 0, "fastrl: `group_ids` must lie in [0, num_groups=", num_groups,
              "), got group_ids[", bad, "] = ", bad < 0 ? 0 : p.group_ids[bad].item<int64_t>());
  return out;
}

#ifdef FASTRL_WITH_CUDA
// Same outputs as the CPU op, bitwise, except that a group id outside [0, num_groups) is not
// raised (that would need a host sync): its sample joins no group and gets a NaN advantage.
AdvOutputs group_advantages_cuda(const at::Tensor& scores, const at::Tensor& group_ids,
                                 const c10::optional<at::Tensor>& weights, int64_t num_groups,
                                 c10::string_view baseline, c10::string_view scale, bool unbiased,
                                 double eps, bool eps_on_var, bool singleton_zero, bool ignore_nan) {
  Prepared p = prepare(scores, group_ids, weights, num_groups, std::string(baseline),
                       std::string(scale), unbiased, eps, eps_on_var, singleton_zero, ignore_nan);
  const c10::cuda::CUDAGuard guard(p.scores.device());  // cub's size query reads the current device
  TORCH_CHECK(num_groups <= cuda::kMaxGroups, "fastrl: `num_groups` must be <= ",
              cuda::kMaxGroups, " on CUDA, got ", num_groups);
  AdvOutputs out = allocate(p.scores, num_groups);
  const int64_t num_samples = p.scores.size(0);
  const size_t workspace_bytes = cuda::group_advantages_workspace_bytes(num_samples, num_groups);
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)},
                                   p.scores.options().dtype(at::kByte));
  const double* w = p.weights.defined() ? p.weights.data_ptr<double>() : nullptr;
  const cudaStream_t stream = stream_of(p.scores);
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scores.scalar_type(),
                                  "fastrl::group_advantages", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_group_advantages<cuda_t>(
        reinterpret_cast<const cuda_t*>(p.scores.data_ptr<scalar_t>()),
        p.group_ids.data_ptr<int64_t>(), w, num_samples, num_groups, p.params,
        std::get<0>(out).data_ptr<float>(), stats_out(out), workspace.data_ptr(), workspace_bytes,
        stream);
  });
  C10_CUDA_CHECK(err);
  return out;
}
#endif

std::tuple<at::Tensor, at::Tensor> dense_ids_cpu(const at::Tensor& keys) {
  TORCH_CHECK(keys.device().is_cpu(), "fastrl: `keys` of dense_ids must be on the CPU, got ",
              keys.device());
  at::Tensor rows;
  if (keys.dim() == 1) {
    TORCH_CHECK(keys.scalar_type() == at::kLong || keys.scalar_type() == at::kInt,
                "fastrl: 1-D `keys` must be int32/int64, got ", keys.scalar_type());
    rows = keys.contiguous().view(at::kByte).view({keys.size(0), -1});
  } else {
    check_dim(keys, "keys", 2);
    check_dtype(keys, "keys", at::kByte);
    rows = keys.contiguous();
  }
  const int64_t n = rows.size(0), width = rows.size(1);
  std::vector<cpu::KeyView> views(static_cast<size_t>(n));
  const uint8_t* base = rows.data_ptr<uint8_t>();
  for (int64_t r = 0; r < n; ++r) views[r] = {base + r * width, width};
  at::Tensor ids = at::empty({n}, rows.options().dtype(at::kLong));
  at::Tensor first = at::empty({n}, rows.options().dtype(at::kLong));
  const int64_t num_keys =
      cpu::dense_ids(views.data(), n, ids.data_ptr<int64_t>(), first.data_ptr<int64_t>());
  return {ids, first.narrow(0, 0, num_keys).clone()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def(
      "group_advantages(Tensor scores, Tensor group_ids, Tensor? weights, int num_groups, "
      "str baseline, str scale, bool unbiased, float eps, bool eps_on_var, bool singleton_zero, "
      "bool ignore_nan) -> (Tensor advantages, Tensor count, Tensor mean, Tensor std, "
      "Tensor min, Tensor max)");
  m.def("dense_ids(Tensor keys) -> (Tensor ids, Tensor first_index)");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("group_advantages", &group_advantages_cpu);
  m.impl("dense_ids", &dense_ids_cpu);
}

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }
#endif

}  // namespace fastrl
