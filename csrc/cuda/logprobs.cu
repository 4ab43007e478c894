// CUDA kernels of the log-prob family (see cuda/logprobs.cuh for the contract).
//
// forward_kernel: one block of kThreads per row (grid-stride over rows). Thread i folds elements
//   [i * P, i * P + P) + k * kThreads * P (P = 16 bytes of T) into its SoftmaxState, a pack at a
//   time (the pack's max, then its P exps: no serial chain per element), then the block
//   merges the states: a warp-shuffle butterfly in a fixed order, then warp 0 merges the warps'
//   states in warp order. Thread 0 writes lse and entropy.
// backward_kernel: same row/thread layout, elementwise: p_j = exp(z_j - lse) and grad_z_labels.
// With K labels per row (top-K), thread k writes log-probs k, k + kThreads, ... after the merge.
#include <cuda_runtime.h>

#include "cuda/logprobs.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

using logprobs::SoftmaxState;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride over rows beyond that

// 16 bytes of T, loaded and stored as one vector.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Adds scaled logit z to the state (a -inf logit adds nothing; NaN / +inf make s NaN, as on the CPU).
__device__ __forceinline__ void add(SoftmaxState& st, float z) {
  if (z == -INFINITY) return;
  if (z > st.m) st = logprobs::rescale(st, z, expf(st.m - z));
  const float d = z - st.m;
  const float e = expf(d);
  st.s += e;
  st.t += e * logprobs::clamp_diff(d);
}

// Adds P scaled logits: the pack's max first (at most one rescale per pack), then P independent
// exps, summed in pack order: no serial chain through the running max per element, and a handful
// of instructions per element (bf16 rows are compute-bound otherwise). The exps are __expf
// (ex2.approx of d * log2(e): relative error ~2^-21 near the max, where the mass is; more for the
// terms far below it, which the sum does not see). Special values as add(): -inf adds nothing
// (__expf(-inf) = 0 and 0 * -FLT_MAX = -0), NaN makes s NaN (fmaxf skips it, then e = NaN), +inf
// becomes the max and its d = inf - inf = NaN. A pack whose max is -inf (all -inf or NaN) is
// skipped, NaN excepted: d would be -inf - -inf = NaN against an empty state.
template <int P>
__device__ __forceinline__ void add_pack(SoftmaxState& st, const float (&z)[P]) {
  float pack_max = -INFINITY;
#pragma unroll
  for (int k = 0; k < P; ++k) pack_max = fmaxf(pack_max, z[k]);
  if (pack_max == -INFINITY) {
    bool nan = false;
#pragma unroll
    for (int k = 0; k < P; ++k) nan |= z[k] != z[k];
    if (nan) st.s = NAN;
    return;
  }
  if (pack_max > st.m) st = logprobs::rescale(st, pack_max, expf(st.m - pack_max));
  float s = 0.0f, t = 0.0f;
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const float d = z[k] - st.m;
    const float e = __expf(d);
    s += e;
    t = fmaf(e, fmaxf(d, -3.402823466e38f), t);  // clamp_diff: 0 * (-inf) -> 0
  }
  st.s += s;
  st.t += t;
}

__device__ __forceinline__ SoftmaxState shfl_xor(const SoftmaxState& a, int mask) {
  SoftmaxState r;
  r.m = __shfl_xor_sync(kFullMask, a.m, mask);
  r.s = __shfl_xor_sync(kFullMask, a.s, mask);
  r.t = __shfl_xor_sync(kFullMask, a.t, mask);
  return r;
}

// The merged state of the block, valid in thread 0. Fixed order: the butterfly merges lane l with
// lane l ^ mask, the lower lane's state first, so every lane of a warp ends with the same bits.
__device__ SoftmaxState block_merge(SoftmaxState st, SoftmaxState* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int mask = 1; mask < kWarp; mask <<= 1) {
    const SoftmaxState other = shfl_xor(st, mask);
    st = (lane & mask) ? logprobs::merge(other, st) : logprobs::merge(st, other);
  }
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  SoftmaxState total = logprobs::state_empty();
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total = logprobs::merge(total, shared[w]);
  }
  __syncthreads();  // shared is reused by the next row
  return total;
}

// Folds this thread's elements of a row into st: 16-byte packs (add_pack) when the row is 16-byte
// aligned, then the tail one element at a time.
template <typename T>
__device__ __forceinline__ void fold_row(const T* row, int64_t vocab, float inv_t, SoftmaxState& st) {
  constexpr int P = Pack<T>::kSize;
  int64_t vec_end = 0;
  if (reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    vec_end = vocab / P * P;
    for (int64_t base = static_cast<int64_t>(threadIdx.x) * P; base < vec_end; base += kThreads * P) {
      const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + base);
      float z[P];
#pragma unroll
      for (int k = 0; k < P; ++k) z[k] = to_float(pack.v[k]) * inv_t;
      add_pack<P>(st, z);
    }
  }
  for (int64_t j = vec_end + threadIdx.x; j < vocab; j += kThreads) add(st, to_float(row[j]) * inv_t);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ logits, int64_t row_stride, const int64_t* __restrict__ labels,
                   int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_t, int64_t ignore_index,
                   float* __restrict__ logprobs, float* __restrict__ entropy, float* __restrict__ lse) {
  __shared__ SoftmaxState shared[kWarps];
  __shared__ float shared_lse;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const T* row = logits + r * row_stride;
    SoftmaxState st = logprobs::state_empty();
    fold_row(row, vocab, inv_t, st);
    st = block_merge(st, shared);
    if (threadIdx.x == 0) {
      const float row_lse = logprobs::state_lse(st);
      lse[r] = row_lse;
      shared_lse = row_lse;
      if (entropy != nullptr) entropy[r] = logprobs::state_entropy(st);
    }
    __syncthreads();  // the next row's write of shared_lse comes after its block_merge barrier
    const float row_lse = shared_lse;
    for (int64_t k = r * num_labels + threadIdx.x; k < (r + 1) * num_labels; k += kThreads) {
      const int64_t y = labels[k];
      float lp;
      if (y == ignore_index) {
        lp = 0.0f;
      } else if (y < 0 || y >= vocab) {
        lp = NAN;
      } else {
        lp = to_float(row[y]) * inv_t - row_lse;
      }
      logprobs[k] = lp;
    }
  }
}

// Not __restrict__: grad may be logits itself (in place); each element is read, then written, by
// the same thread, and the one-hot terms need only that element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* logits, int64_t row_stride, const int64_t* __restrict__ labels,
                    int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_t, int64_t ignore_index,
                    const float* __restrict__ lse, const float* __restrict__ entropy,
                    const float* __restrict__ g_lp, const float* __restrict__ g_ent,
                    const float* __restrict__ g_lse, T* grad, int64_t grad_row_stride) {
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const T* row = logits + r * row_stride;
    T* out = grad + r * grad_row_stride;
    const int64_t* y = labels + r * num_labels;
    const float* g = g_lp != nullptr ? g_lp + r * num_labels : nullptr;
    // A label counts when it is in range (an out-of-range one has NaN log-prob and no gradient).
    auto counts = [&](int64_t label) { return label != ignore_index && label >= 0 && label < vocab; };
    float glp = 0.0f;  // sum over the row's labels, in label order (as the CPU kernel)
    for (int64_t k = 0; k < num_labels; ++k) glp += (g != nullptr && counts(y[k])) ? g[k] : 0.0f;
    const float row_lse = lse[r];
    const float row_ent = g_ent != nullptr ? entropy[r] : 0.0f;
    const float gent = g_ent != nullptr ? g_ent[r] : 0.0f;
    const float glse = g_lse != nullptr ? g_lse[r] : 0.0f;
    // Only log-prob gradients (no entropy or lse term, the common case; uniform over the block):
    // grad_z_labels reduces to weight - p * g_lp, bit for bit, in fewer instructions.
    const bool lp_only = gent == 0.0f && glse == 0.0f && isfinite(row_ent);
    auto grad_at = [&](int64_t j, float x) {
      const float z = x * inv_t;
      const float p = __expf(z - row_lse);  // as the forward's exps (see add_pack)
      float weight = 0.0f;
      for (int64_t k = 0; k < num_labels; ++k) weight += (g != nullptr && y[k] == j && counts(j)) ? g[k] : 0.0f;
      if (lp_only) return (weight - (p == 0.0f ? 0.0f : p * glp)) * inv_t;
      return logprobs::grad_z_labels(z, p, row_lse, row_ent, glp, gent, glse, weight) * inv_t;
    };
    constexpr int P = Pack<T>::kSize;
    int64_t vec_end = 0;
    if (reinterpret_cast<uintptr_t>(row) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
      vec_end = vocab / P * P;
      for (int64_t base = static_cast<int64_t>(threadIdx.x) * P; base < vec_end; base += kThreads * P) {
        const Pack<T> in = *reinterpret_cast<const Pack<T>*>(row + base);
        Pack<T> res;
#pragma unroll
        for (int k = 0; k < P; ++k) res.v[k] = store_as<T>(grad_at(base + k, to_float(in.v[k])));
        *reinterpret_cast<Pack<T>*>(out + base) = res;
      }
    }
    for (int64_t j = vec_end + threadIdx.x; j < vocab; j += kThreads) {
      out[j] = store_as<T>(grad_at(j, to_float(row[j])));
    }
  }
}

unsigned blocks_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks);
}

}  // namespace

template <typename T>
cudaError_t launch_logprobs_forward(const T* logits, int64_t row_stride, const int64_t* labels,
                                    int64_t num_rows, int64_t num_labels, int64_t vocab, float inv_temperature,
                                    int64_t ignore_index, float* logprobs, float* entropy, float* lse,
                                    cudaStream_t stream) {
  if (num_rows < 0 || num_labels < 0 || vocab < 1) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  forward_kernel<T><<<blocks_for(num_rows), kThreads, 0, stream>>>(
      logits, row_stride, labels, num_rows, num_labels, vocab, inv_temperature, ignore_index, logprobs,
      entropy, lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_logprobs_backward(const T* logits, int64_t row_stride, const int64_t* labels,
                                     int64_t num_rows, int64_t num_labels, int64_t vocab,
                                     float inv_temperature, int64_t ignore_index, const float* lse,
                                     const float* entropy, const float* g_lp, const float* g_ent,
                                     const float* g_lse, T* grad_logits, int64_t grad_row_stride,
                                     cudaStream_t stream) {
  if (num_rows < 0 || num_labels < 0 || vocab < 1) return cudaErrorInvalidValue;
  if (num_rows == 0) return cudaSuccess;
  backward_kernel<T><<<blocks_for(num_rows), kThreads, 0, stream>>>(
      logits, row_stride, labels, num_rows, num_labels, vocab, inv_temperature, ignore_index, lse,
      entropy, g_lp, g_ent, g_lse, grad_logits, grad_row_stride);
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE(T)                                                                      \
  template cudaError_t launch_logprobs_forward<T>(const T*, int64_t, const int64_t*, int64_t,      \
                                                  int64_t, int64_t, float, int64_t, float*, float*, \
                                                  float*, cudaStream_t);                           \
  template cudaError_t launch_logprobs_backward<T>(const T*, int64_t, const int64_t*, int64_t,     \
                                                   int64_t, int64_t, float, int64_t, const float*, \
                                                   const float*, const float*, const float*,       \
                                                   const float*, T*, int64_t, cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
