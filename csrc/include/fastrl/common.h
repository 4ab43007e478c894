// Portable macros shared by the CPU (.cpp) and CUDA (.cu) translation units.
// No torch, no CUDA runtime: this header must compile with a plain C++17 compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTRL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTRL_HOST_DEVICE inline
#endif

#include <cmath>
#include <cstdint>

namespace fastrl {

// NaN-propagating min/max: std::fmin/fmax drop NaNs, but a NaN score must be visible in the
// group statistics unless the caller asked to ignore NaNs.
FASTRL_HOST_DEVICE double nan_min(double a, double b) { return (a != a || a < b) ? a : b; }
FASTRL_HOST_DEVICE double nan_max(double a, double b) { return (a != a || a > b) ? a : b; }

}  // namespace fastrl
