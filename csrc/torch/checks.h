// Input checks shared by every op: each failure names the argument, what was expected and what
// was given, so a user can fix the call without reading our source.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>

namespace fastrl {

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "fastrl: `", name, "` must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              "fastrl: `", name, "` must be a floating tensor (float32/float64/bfloat16/float16), got ",
              t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "fastrl: `", name, "` must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "fastrl: `", name, "` is on ", t.device(), " but `",
              ref_name, "` is on ", ref.device(), "; move both to the same device");
}

inline void check_same_size0(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.size(0) == ref.size(0), "fastrl: `", name, "` has ", t.size(0),
              " entries but `", ref_name, "` has ", ref.size(0));
}

inline void check_num_groups(int64_t num_groups, int64_t num_samples) {
  TORCH_CHECK(num_groups >= 0, "fastrl: `num_groups` must be >= 0, got ", num_groups);
  TORCH_CHECK(num_groups > 0 || num_samples == 0,
              "fastrl: `num_groups` is 0 but there are ", num_samples, " samples");
}

// Per-sample floating `scores` [B] and int64 `group_ids` [B] on one device, with num_groups ids.
inline void check_grouped_scores(const at::Tensor& scores, const at::Tensor& group_ids, int64_t num_groups) {
  check_dim(scores, "scores", 1);
  check_floating(scores, "scores");
  check_dim(group_ids, "group_ids", 1);
  check_dtype(group_ids, "group_ids", at::kLong);
  check_same_size0(group_ids, "group_ids", scores, "scores");
  check_same_device(group_ids, "group_ids", scores, "scores");
  check_num_groups(num_groups, scores.numel());
}

// Row offsets of a packed layout for `tokens` [N] (named `name`): cu_seqlens int64 [B + 1],
// contiguous, on tokens' device; on the CPU also from 0, non-decreasing and ending at N (on CUDA
// trusted: checking would need a host sync). Returns B.
inline int64_t check_cu_seqlens(const at::Tensor& cu, const at::Tensor& tokens, const char* name) {
  check_dim(tokens, name, 1);
  check_dim(cu, "cu_seqlens", 1);
  check_dtype(cu, "cu_seqlens", at::kLong);
  check_same_device(cu, "cu_seqlens", tokens, name);
  TORCH_CHECK(cu.size(0) >= 1, "fastrl: `cu_seqlens` must hold B + 1 >= 1 offsets, got 0");
  TORCH_CHECK(cu.is_contiguous(), "fastrl: `cu_seqlens` must be contiguous");
  const int64_t num_rows = cu.size(0) - 1, n = tokens.size(0);
  if (cu.device().is_cpu()) {
    const int64_t* c = cu.data_ptr<int64_t>();
    TORCH_CHECK(c[0] == 0, "fastrl: `cu_seqlens` must start at 0, got cu_seqlens[0] = ", c[0]);
    for (int64_t b = 0; b < num_rows; ++b) {
      TORCH_CHECK(c[b + 1] >= c[b], "fastrl: `cu_seqlens` must be non-decreasing, got cu_seqlens[",
                  b, "] = ", c[b], " > cu_seqlens[", b + 1, "] = ", c[b + 1]);
    }
    TORCH_CHECK(c[num_rows] == n, "fastrl: `cu_seqlens` must end at the number of tokens N = ", n,
                " (`", name, "` has ", n, "), got cu_seqlens[-1] = ", c[num_rows]);
  }
  return num_rows;
}

// Masks may be bool, uint8, int32, int64, float32 or float64 (what trainers pass); kernels are
// templated on the mask type, so no converted copy is made.
inline void check_mask_dtype(const at::Tensor& mask) {
  const auto s = mask.scalar_type();
  TORCH_CHECK(s == at::kBool || s == at::kByte || s == at::kInt || s == at::kLong ||
                  s == at::kFloat || s == at::kDouble,
              "fastrl: `mask` must be bool, uint8, int32, int64, float32 or float64, got ", s);
}

}  // namespace fastrl

// Runs the lambda __VA_ARGS__ with `mask_t` bound to the C++ type of a mask checked by
// check_mask_dtype.
#define FASTRL_DISPATCH_MASK(mask_type, ...)                                          \
  [&] {                                                                               \
    switch (mask_type) {                                                              \
      case at::kBool: { using mask_t = bool; return __VA_ARGS__(); }                  \
      case at::kByte: { using mask_t = uint8_t; return __VA_ARGS__(); }               \
      case at::kInt: { using mask_t = int32_t; return __VA_ARGS__(); }                \
      case at::kLong: { using mask_t = int64_t; return __VA_ARGS__(); }               \
      case at::kFloat: { using mask_t = float; return __VA_ARGS__(); }                \
      default: { using mask_t = double; return __VA_ARGS__(); }                       \
    }                                                                                 \
  }()
