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

}  // namespace fastrl
