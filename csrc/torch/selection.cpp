// torch bindings of the best-of-N / selection family: schemas, input checks, CPU/CUDA dispatch.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

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

void check_ks(at::IntArrayRef ks) {
  TORCH_CHECK(!ks.empty(), "fastrl: `ks` must hold at least one k");
  for (const int64_t k : ks) TORCH_CHECK(k >= 1, "fastrl: every k of `ks` must be >= 1, got ", k);
}

Inputs check_grouped(const at::Tensor& scores, const at::Tensor& group_ids, int64_t num_groups) {
  check_grouped_scores(scores, group_ids, num_groups);
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
  check_ks(ks);
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

void check_pairs_args(double margin, int64_t max_pairs) {
  TORCH_CHECK_VALUE(margin >= 0.0, "fastrl: `margin` must be >= 0, got ", margin);
  TORCH_CHECK_VALUE(max_pairs >= 0, "fastrl: `max_pairs` must be >= 0, got ", max_pairs);
}

std::tuple<at::Tensor, at::Tensor> all_pairs_cpu(const at::Tensor& scores,
                                                 const at::Tensor& group_ids, int64_t num_groups,
                                                 double margin, int64_t max_pairs) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  check_pairs_args(margin, max_pairs);
  at::Tensor chosen = at::empty({max_pairs}, in.group_ids.options());
  at::Tensor rejected = at::empty({max_pairs}, in.group_ids.options());
  int64_t bad = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::all_pairs", [&] {
    bad = cpu::all_pairs<scalar_t>(in.scores.data_ptr<scalar_t>(),
                                   in.group_ids.data_ptr<int64_t>(), in.scores.size(0), num_groups,
                                   margin, max_pairs, chosen.data_ptr<int64_t>(),
                                   rejected.data_ptr<int64_t>());
  });
  check_group_id(in.group_ids, bad, num_groups);
  return {chosen, rejected};
}

struct MajInputs {
  at::Tensor answer_ids, correct, group_ids;  // contiguous
};

MajInputs check_maj(const at::Tensor& answer_ids, const at::Tensor& correct,
                    const at::Tensor& group_ids, int64_t num_groups, at::IntArrayRef ks) {
  check_dim(answer_ids, "answer_ids", 1);
  check_dtype(answer_ids, "answer_ids", at::kLong);
  check_dim(correct, "correct", 1);
  check_dtype(correct, "correct", at::kBool);
  check_dim(group_ids, "group_ids", 1);
  check_dtype(group_ids, "group_ids", at::kLong);
  check_same_size0(correct, "correct", answer_ids, "answer_ids");
  check_same_size0(group_ids, "group_ids", answer_ids, "answer_ids");
  check_same_device(correct, "correct", answer_ids, "answer_ids");
  check_same_device(group_ids, "group_ids", answer_ids, "answer_ids");
  check_num_groups(num_groups, answer_ids.numel());
  check_ks(ks);
  return {answer_ids.contiguous(), correct.contiguous(), group_ids.contiguous()};
}

at::Tensor maj_at_k_cpu(const at::Tensor& answer_ids, const at::Tensor& correct,
                        const at::Tensor& group_ids, int64_t num_groups, at::IntArrayRef ks) {
  const MajInputs in = check_maj(answer_ids, correct, group_ids, num_groups, ks);
  const at::Tensor &a = in.answer_ids, &c = in.correct, &g = in.group_ids;
  at::Tensor out = at::empty({num_groups, static_cast<int64_t>(ks.size())},
                             a.options().dtype(at::kDouble));
  const cpu::MajStatus st =
      cpu::maj_at_k(a.data_ptr<int64_t>(), c.data_ptr<bool>(), g.data_ptr<int64_t>(), a.size(0),
                    num_groups, ks.data(), static_cast<int64_t>(ks.size()), out.data_ptr<double>());
  check_group_id(g, st.bad_group_sample, num_groups);
  TORCH_CHECK_VALUE(st.mixed_group < 0,
                    "fastrl: `correct` must be the same for every sample with the same answer id "
                    "within a group; answer id ", st.mixed_answer, " has both in group ",
                    st.mixed_group);
  TORCH_CHECK_VALUE(st.too_large_group < 0, "fastrl: maj_at_k computes k <= 1000 exactly; group ",
                    st.too_large_group, " has more than 1000 samples and a k above 1000");
  return out;
}

#ifdef FASTRL_WITH_CUDA
// The byte workspace of a launch on `like`'s device (whose guard the caller holds: cub's size
// queries read the current device), after the group-count limit of the 32-bit sort keys.
at::Tensor cuda_workspace(const at::Tensor& like, int64_t num_groups, size_t bytes) {
  TORCH_CHECK(num_groups <= cuda::kMaxSelectionGroups, "fastrl: `num_groups` must be <= ",
              cuda::kMaxSelectionGroups, " on CUDA, got ", num_groups);
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Same result as the CPU op, bitwise, except that an out-of-range group id is ignored instead of
// raised (raising would need a host sync).
at::Tensor best_of_n_cuda(const at::Tensor& scores, const at::Tensor& group_ids,
                          int64_t num_groups, int64_t k, bool largest) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  TORCH_CHECK(k >= 1, "fastrl: `k` must be >= 1, got ", k);
  const c10::cuda::CUDAGuard guard(in.scores.device());
  const int64_t n = in.scores.size(0);
  const size_t bytes =
      cuda::best_of_n_workspace_bytes(n, num_groups, k, in.scores.element_size());
  at::Tensor workspace = cuda_workspace(in.scores, num_groups, bytes);
  at::Tensor out = at::empty({num_groups, k}, in.group_ids.options());
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

// The CPU op's result (bitwise without replacement), except that an out-of-range group id is
// ignored instead of raised. No host sync: the ks travel as kernel arguments.
at::Tensor expected_best_of_k_cuda(const at::Tensor& scores, const at::Tensor& group_ids,
                                   int64_t num_groups, at::IntArrayRef ks, bool replacement,
                                   bool largest) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  check_ks(ks);
  const c10::cuda::CUDAGuard guard(in.scores.device());
  const int64_t n = in.scores.size(0);
  const size_t bytes = cuda::expected_best_of_k_workspace_bytes(n, num_groups);
  at::Tensor workspace = cuda_workspace(in.scores, num_groups, bytes);
  at::Tensor out = at::empty({num_groups, static_cast<int64_t>(ks.size())},
                             in.scores.options().dtype(at::kDouble));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::expected_best_of_k", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_expected_best_of_k<cuda_t>(
        reinterpret_cast<const cuda_t*>(in.scores.data_ptr<scalar_t>()),
        in.group_ids.data_ptr<int64_t>(), n, num_groups, ks.data(),
        static_cast<int64_t>(ks.size()), replacement, largest, out.data_ptr<double>(),
        workspace.data_ptr(), bytes, stream_of(in.scores));
  });
  C10_CUDA_CHECK(err);
  return out;
}

// The CPU op's pairs, except that an out-of-range group id is ignored instead of raised.
std::tuple<at::Tensor, at::Tensor> all_pairs_cuda(const at::Tensor& scores,
                                                  const at::Tensor& group_ids, int64_t num_groups,
                                                  double margin, int64_t max_pairs) {
  Inputs in = check_grouped(scores, group_ids, num_groups);
  check_pairs_args(margin, max_pairs);
  const c10::cuda::CUDAGuard guard(in.scores.device());
  const int64_t n = in.scores.size(0);
  const size_t bytes = cuda::all_pairs_workspace_bytes(n, num_groups);
  at::Tensor workspace = cuda_workspace(in.scores, num_groups, bytes);
  at::Tensor chosen = at::empty({max_pairs}, in.group_ids.options());
  at::Tensor rejected = at::empty({max_pairs}, in.group_ids.options());
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastrl::all_pairs", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    err = cuda::launch_all_pairs<cuda_t>(
        reinterpret_cast<const cuda_t*>(in.scores.data_ptr<scalar_t>()),
        in.group_ids.data_ptr<int64_t>(), n, num_groups, margin, max_pairs,
        chosen.data_ptr<int64_t>(), rejected.data_ptr<int64_t>(), workspace.data_ptr(), bytes,
        stream_of(in.scores));
  });
  C10_CUDA_CHECK(err);
  return {chosen, rejected};
}

// The CPU op's result, bitwise, except that where the CPU raises (an answer id both correct and
// not in a group, a k beyond kMaxMajK in a group that large) the group's row is NaN and an
// out-of-range group id is ignored: raising would need a host sync. The ks travel as kernel
// arguments.
at::Tensor maj_at_k_cuda(const at::Tensor& answer_ids, const at::Tensor& correct,
                         const at::Tensor& group_ids, int64_t num_groups, at::IntArrayRef ks) {
  const MajInputs in = check_maj(answer_ids, correct, group_ids, num_groups, ks);
  const c10::cuda::CUDAGuard guard(in.answer_ids.device());
  const int64_t n = in.answer_ids.size(0);
  const size_t bytes =
      cuda::maj_at_k_workspace_bytes(n, num_groups, *std::max_element(ks.begin(), ks.end()));
  at::Tensor workspace = cuda_workspace(in.answer_ids, num_groups, bytes);
  at::Tensor out = at::empty({num_groups, static_cast<int64_t>(ks.size())},
                             in.answer_ids.options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::launch_maj_at_k(
      in.answer_ids.data_ptr<int64_t>(), in.correct.data_ptr<bool>(),
      in.group_ids.data_ptr<int64_t>(), n, num_groups, ks.data(), static_cast<int64_t>(ks.size()),
      out.data_ptr<double>(), workspace.data_ptr(), bytes, stream_of(in.answer_ids)));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def("best_of_n(Tensor scores, Tensor group_ids, int num_groups, int k, bool largest) -> Tensor");
  m.def(
      "expected_best_of_k(Tensor scores, Tensor group_ids, int num_groups, int[] ks, "
      "bool replacement, bool largest) -> Tensor");
  m.def(
      "all_pairs(Tensor scores, Tensor group_ids, int num_groups, float margin, int max_pairs) "
      "-> (Tensor, Tensor)");
  m.def(
      "maj_at_k(Tensor answer_ids, Tensor correct, Tensor group_ids, int num_groups, int[] ks) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("best_of_n", &best_of_n_cpu);
  m.impl("expected_best_of_k", &expected_best_of_k_cpu);
  m.impl("all_pairs", &all_pairs_cpu);
  m.impl("maj_at_k", &maj_at_k_cpu);
}

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) {
  m.impl("best_of_n", &best_of_n_cuda);
  m.impl("expected_best_of_k", &expected_best_of_k_cuda);
  m.impl("all_pairs", &all_pairs_cuda);
  m.impl("maj_at_k", &maj_at_k_cuda);
}
#endif

}  // namespace fastrl
