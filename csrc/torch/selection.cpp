// torch bindings of the best-of-N / selection family: schemas, input checks, CPU/CUDA dispatch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cpu/selection.h"
#include "torch/checks.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/selection.cuh"
#endif

namespace fastrl {
namespace {

struct Inputs {
  at::Tensor scores, group_ids;  // contiguous
};

Inputs check_grouped(const at::Tensor& scores, const at::Tensor& group_ids, int64_t num_groups) {
  check_dim(scores, "scores", 1);
  check_floating(scores, "scores");
  check_dim(group_ids, "group_ids", 1);
  check_dtype(group_ids, "group_ids", at::kLong);
  check_same_size0(group_ids, "group_ids", scores, "scores");
  check_same_device(group_ids, "group_ids", scores, "scores");
  TORCH_CHECK(num_groups >= 0, "fastrl: `num_groups` must be >= 0, got ", num_groups);
  TORCH_CHECK(num_groups > 0 || scores.numel() == 0,
              "fastrl: `num_groups` is 0 but there are ", scores.numel(), " samples");
  return {scores.contiguous(), group_ids.contiguous()};
}

// Raises for the sample `bad` (>= 0) whose group id a CPU kernel found out of range.
void check_group_id(const at::Tensor& group_ids, int64_t bad, int64_t num_groups) {
  TORCH_CHECK(bad < 0, "fastrl: `group_ids` must lie in [0, num_groups=", num_groups,
              "), got group_ids[", bad, "] = ", bad < 0 ? 0 : group_ids.data_ptr<int64_t>()[bad]);
}

at::Tensor best_of_n_cpu(const at::Tensor& scores, const at::Tensor& group_ids, int64_t num_groups,
                         int64_t k, bool largest) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  TORCH_CHECK(k >= 1, "fastrl: `k` must be >= 1, got ", k);
  at::Tensor out = at::empty({num_groups, k}, in.group_ids.options());
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::best_of_n", [&] {
    bad = cpu::best_of_n<scalar_t>(in.scores.data_ptr<scalar_t>(),
                                   in.group_ids.data_ptr<int64_t>(), in.scores.size(0),
                                   num_groups, k, largest, out.data_ptr<int64_t>());
  });
  check_group_id(in.group_ids, bad, num_groups);
  return out;
}

at::Tensor expected_best_of_k_cpu(const at::Tensor& scores, const at::Tensor& group_ids,
                                  int64_t num_groups, at::IntArrayRef ks, bool replacement,
                                  bool largest) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  TORCH_CHECK(!ks.empty(), "fastrl: `ks` must hold at least one k");
  for (const int64_t k : ks) TORCH_CHECK(k >= 1, "fastrl: every k of `ks` must be >= 1, got ", k);
  at::Tensor out = at::empty({num_groups, static_cast<int64_t>(ks.size())},
                             in.scores.options().dtype(at::kDouble));
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::expected_best_of_k", [&] {
    bad = cpu::expected_best_of_k<scalar_t>(
        in.scores.data_ptr<scalar_t>(), in.group_ids.data_ptr<int64_t>(), in.scores.size(0),
        num_groups, ks.data(), static_cast<int64_t>(ks.size()), replacement, largest,
        out.data_ptr<double>());
  });
  check_group_id(in.group_ids, bad, num_groups);
  return out;
}

#ifdef FASTRL_WITH_CUDA
// Same result as the CPU op, bitwise, except that an out-of-range group id is ignored instead of
// raised (raising would need a host sync).
at::Tensor best_of_n_cuda(const at::Tensor& scores, const at::Tensor& group_ids,
                          int64_t num_groups, int64_t k, bool largest) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  TORCH_CHECK(k >= 1, "fastrl: `k` must be >= 1, got ", k);
  const c10::cuda::CUDAGuard guard(in.scores.device());  // cub's size query reads the current device
  TORCH_CHECK(num_groups <= cuda::kMaxSelectionGroups, "fastrl: `num_groups` must be <= ",
              cuda::kMaxSelectionGroups, " on CUDA, got ", num_groups);
  at::Tensor out = at::empty({num_groups, k}, in.group_ids.options());
  const int64_t n = in.scores.size(0);
  const size_t bytes = cuda::best_of_n_workspace_bytes(n, num_groups, k);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, in.scores.options().dtype(at::kByte));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::best_of_n", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_best_of_n<cuda_t>(
        reinterpret_cast<const cuda_t*>(in.scores.data_ptr<scalar_t>()),
        in.group_ids.data_ptr<int64_t>(), n, num_groups, k, largest, out.data_ptr<int64_t>(),
        workspace.data_ptr(), bytes, stream_of(in.scores));
  });
  C10_CUDA_CHECK(err);
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def("best_of_n(Tensor scores, Tensor group_ids, int num_groups, int k, bool largest) -> Tensor");
  m.def(
      "expected_best_of_k(Tensor scores, Tensor group_ids, int num_groups, int[] ks, "
      "bool replacement, bool largest) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("best_of_n", &best_of_n_cpu);
  m.impl("expected_best_of_k", &expected_best_of_k_cpu);
}

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) { m.impl("best_of_n", &best_of_n_cuda); }
#endif

}  // namespace fastrl
