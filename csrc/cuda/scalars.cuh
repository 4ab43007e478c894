// Loads and stores of the element types the CUDA kernels take — float, double, __half and
// __nv_bfloat16 values; bool/uint8/int32/int64/float/double masks — in one place, so every kernel
// widens and rounds the same way.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastrl {
namespace cuda {

// x in the type kernels compute in: float for float/half/bf16, double for double (exact).
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// x as float (a double rounds to nearest) or as double (exact).
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(widen(x));
}
template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(widen(x));
}

// x rounded to nearest into O.
template <typename O>
__device__ __forceinline__ O store_as(float x) {
  return static_cast<O>(x);
}
template <>
__device__ __forceinline__ __half store_as<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename O>
__device__ __forceinline__ O store_as(double x) {
  return static_cast<O>(x);
}

// Whether mask entry m marks a valid position (nonzero).
template <typename M>
__device__ __forceinline__ bool is_valid(M m) {
  return m != M(0);
}
template <>
__device__ __forceinline__ bool is_valid<bool>(bool m) {
  return m;
}

}  // namespace cuda
}  // namespace fastrl
