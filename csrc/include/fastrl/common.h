// Portable macros shared by the CPU (.cpp) and CUDA (.cu) translation units.
// No torch, no CUDA runtime: this header must compile with a plain C++17 compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTRL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTRL_HOST_DEVICE inline
#endif
// Per-token math that a CPU kernel's ISA variants (cpu/simd.h) must inline: a call would both cost
// more than the math and run it with the baseline ISA's registers.
#if defined(__CUDACC__)
#define FASTRL_HOST_DEVICE_HOT FASTRL_HOST_DEVICE
#else
#define FASTRL_HOST_DEVICE_HOT inline __attribute__((always_inline))
#endif

#include <cmath>
#include <cstdint>

namespace fastrl {

// NaN-propagating min/max: std::fmin/fmax drop NaNs, but a NaN score must be visible in the
// group statistics unless the caller asked to ignore NaNs.
// Written as selects, not branches: min/max of random data would mispredict every other sample.
FASTRL_HOST_DEVICE double nan_min(double a, double b) {
  const double m = b < a ? b : a;
  return b != b ? b : m;  // a NaN a is kept by the select above (a NaN compares false)
}
FASTRL_HOST_DEVICE double nan_max(double a, double b) {
  const double m = b > a ? b : a;
  return b != b ? b : m;
}

// a * b, never fused with a neighbouring add into an FMA. An FMA rounds once instead of twice, and
// nvcc contracts a * b + c into one by default (--fmad=true): every product that feeds a sum in the
// shared math goes through mul_rn so the CPU and CUDA kernels round identically (bitwise-equal
// results). On the device __dmul_rn is never contracted; on the host the C++ build must not
// contract either (-ffp-contract=off: GCC's C++ default is "fast", which fuses on targets with FMA
// such as aarch64 or -march=haswell; plain x86-64 has no FMA instruction).
FASTRL_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// (count, mean, M2) of a set of values: Chan's parallel merge, for batch statistics merged in a
// fixed order (deterministic, the same bits on the CPU and the GPU). An empty side is returned
// as is, so infinite means never meet a 0 * inf.
struct Moments {
  double count;
  double mean;
  double m2;
};

FASTRL_HOST_DEVICE Moments moments_empty() { return Moments{0.0, 0.0, 0.0}; }

FASTRL_HOST_DEVICE Moments moments_merge(const Moments& a, const Moments& b) {
  if (b.count == 0.0) return a;
  if (a.count == 0.0) return b;
  const double n = a.count + b.count;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + mul_rn(delta, b.count / n),
                 a.m2 + b.m2 + mul_rn(mul_rn(delta, delta), a.count * b.count / n)};
}

}  // namespace fastrl
