// What every family's CUDA dispatch needs (only included under FASTRL_WITH_CUDA).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastrl {

// The CUDA scalar type of a torch scalar type (same bits: c10::Half is __half, c10::BFloat16 is
// __nv_bfloat16), for handing data_ptr<scalar_t>() to the torch-free launch functions.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The current stream of t's device: where an op's kernels are enqueued.
inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace fastrl
