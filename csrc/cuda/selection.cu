// CUDA kernels of the best-of-N / selection family (see cuda/selection.cuh for the contract).
//
// best_of_n: no sort. 16/32-bit scores: each sample offers its packed key (fastrl/selection.h)
// to its group's k slots with the atomic-max cascade, the slots living in the output itself, then
// one pass decodes them in place. fp64 scores (and batches past 2^32 samples), whose keys would
// not fit one atomic: the same cascade twice, score keys into a workspace cut, then index keys
// into the slots of the output where each score ties (selection::tie_slots).
// expected_best_of_k, all_pairs and maj_at_k start from a cub radix sort of the samples by group
// id (32-bit keys, only the bits the ids need; LSD, so stable), then run one thread per group over
// its contiguous segment, which it finds by binary search: the order-statistic sums (values first
// sorted by value, so each segment comes out ascending), the pairs, the maj@k DP.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "cuda/selection.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kGridCap = 1 << 16;  // grid-stride loops beyond that
constexpr size_t kChunk = 256;         // alignment of every workspace part

__global__ void __launch_bounds__(kThreads)
    sort_keys_kernel(const int64_t* __restrict__ group_ids, int64_t n, int64_t num_groups,
                     uint32_t* __restrict__ keys, int64_t* __restrict__ values) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = group_ids[i];
    keys[i] = static_cast<uint32_t>(g >= 0 && g < num_groups ? g : num_groups);
    if (values != nullptr) values[i] = i;
  }
}

// First position of sorted keys[0, n) holding a key >= target.
__device__ __forceinline__ int64_t segment_start(const uint32_t* __restrict__ keys, int64_t n,
                                                 uint32_t target) {
  int64_t lo = 0;
  while (n > 0) {
    const int64_t half = n >> 1;
    if (keys[lo + half] < target) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

// A slot of a group's list takes the max of itself and x; returns its old value.
struct SlotMax {
  __device__ __forceinline__ uint64_t operator()(unsigned long long* slot, uint64_t x) const {
    return atomicMax(slot, static_cast<unsigned long long>(x));
  }
};

// What a best_of_n cascade kernel offers: the packed key (one pass), the score key (pass 1 of
// two) or the index key to the tie slots (pass 2, `cut` the final pass-1 slots).
enum class Offer { kPacked, kScore, kIndex };

// One thread per sample: its key down its group's k slots (lists[num_groups * k], zeroed).
template <Offer kOffer, typename T>
__global__ void __launch_bounds__(kThreads)
    cascade_kernel(const T* __restrict__ scores, const int64_t* __restrict__ group_ids, int64_t n,
                   int64_t num_groups, int64_t k, bool largest,
                   const unsigned long long* __restrict__ cut, unsigned long long* lists) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = group_ids[i];
    const double x = to_double(scores[i]);  // exact for float/half/bf16
    if (g < 0 || g >= num_groups || x != x) continue;  // out of range: ignored; NaN: never selected
    unsigned long long* slots = lists + g * k;
    if (kOffer == Offer::kPacked) {
      selection::cascade_offer(slots, k,
                               selection::member_key<uint64_t>(static_cast<float>(x), i, largest),
                               SlotMax());
    } else if (kOffer == Offer::kScore) {
      selection::cascade_offer(slots, k, selection::score_key(x, largest), SlotMax());
    } else {
      int64_t first = 0, count = 0;
      const uint64_t* group_cut = reinterpret_cast<const uint64_t*>(cut + g * k);
      if (selection::tie_slots(group_cut, k, selection::score_key(x, largest), &first, &count)) {
        selection::cascade_offer(slots + first, count, selection::index_key(i), SlotMax());
      }
    }
  }
}

// The keys of the lists to sample indices (-1 for an empty slot), in place: packed keys, or index
// keys (the two-pass path).
__global__ void __launch_bounds__(kThreads)
    decode_kernel(int64_t* lists, int64_t total, bool packed) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = static_cast<uint64_t>(lists[j]);
    lists[j] = packed ? selection::member_index(key) : selection::index_of(key);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    to_double_kernel(const T* __restrict__ scores, int64_t n, double* __restrict__ vals) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    vals[i] = to_double(scores[i]);
  }
}

// The ks of one launch, passed by value (no host-to-device copy): columns first..first+num-1.
constexpr int kKsPerLaunch = 32;
struct KChunk {
  int64_t k[kKsPerLaunch];
  int64_t num, first, num_k;  // num_k: the output's row length
};

// One thread per group over its segment of `vals` (sorted by group, ascending within a group).
__global__ void __launch_bounds__(kThreads)
    expected_best_kernel(const double* __restrict__ vals, const uint32_t* __restrict__ keys,
                         int64_t num_samples, int64_t num_groups, KChunk ks, bool replacement,
                         bool largest, double* __restrict__ out) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < num_groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = segment_start(keys, num_samples, static_cast<uint32_t>(g));
    const int64_t end = segment_start(keys, num_samples, static_cast<uint32_t>(g + 1));
    const int64_t n = end - begin;
    bool has_nan = false;
    for (int64_t p = begin; p < end; ++p) has_nan |= vals[p] != vals[p];
    // best first: from the segment's last value (largest) or its first (smallest)
    const double* v = largest && n > 0 ? vals + end - 1 : vals + begin;
    const int64_t step = largest ? -1 : 1;
    double* row = out + g * ks.num_k + ks.first;
    for (int64_t j = 0; j < ks.num; ++j) {
      row[j] = has_nan ? NAN : selection::expected_best(v, step, n, ks.k[j], replacement);
    }
  }
}

unsigned grid_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kGridCap ? kGridCap : b));
}

size_t round_up(size_t bytes) { return (bytes + kChunk - 1) / kChunk * kChunk; }

// A workspace cut into N parts, each starting kChunk-aligned from the workspace's first
// kChunk-aligned byte.
template <int N>
struct Parts {
  size_t sizes[N] = {};

  size_t offset(int part) const {
    size_t off = 0;
    for (int j = 0; j < part; ++j) off += round_up(sizes[j]);
    return off;
  }
  size_t total() const { return offset(N) + kChunk; }  // + slack for an unaligned pointer
  void* part(void* workspace, int j) const {
    const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + kChunk - 1) / kChunk * kChunk;
    return reinterpret_cast<void*>(base + offset(j));
  }
};

// Radix-sort bits that hold the keys 0..num_groups (num_groups: the out-of-range sentinel).
int group_key_bits(int64_t num_groups) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= num_groups) ++bits;
  return bits;
}

// Bytes of cub temporary storage a radix sort of n (Key, Value) pairs over `bits` key bits needs.
template <typename Key, typename Value>
cudaError_t sort_temp_bytes(int64_t n, int bits, size_t* bytes) {
  *bytes = 0;
  if (n == 0) return cudaSuccess;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const Key*>(nullptr),
                                         static_cast<Key*>(nullptr),
                                         static_cast<const Value*>(nullptr),
                                         static_cast<Value*>(nullptr), n, 0, bits, nullptr);
}

// The ks columns first..first + kKsPerLaunch - 1 (fewer at the end) of ks[num_k].
KChunk k_chunk(const int64_t* ks, int64_t num_k, int64_t first) {
  KChunk chunk{};
  chunk.num = num_k - first < kKsPerLaunch ? num_k - first : kKsPerLaunch;
  chunk.first = first;
  chunk.num_k = num_k;
  for (int64_t j = 0; j < chunk.num; ++j) chunk.k[j] = ks[first + j];
  return chunk;
}

// The samples sorted by group (stable: each group's members contiguous, in index order):
// keys[n] the sorted group keys, members[n] the sample indices; keys_in/members_in are scratch.
cudaError_t sort_by_group(const int64_t* group_ids, int64_t n, int64_t num_groups, int bits,
                          uint32_t* keys_in, uint32_t* keys, int64_t* members_in, int64_t* members,
                          void* temp, size_t temp_bytes, cudaStream_t stream) {
  sort_keys_kernel<<<grid_for(n), kThreads, 0, stream>>>(group_ids, n, num_groups, keys_in,
                                                         members_in);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys, members_in, members, n,
                                         0, bits, stream);
}

// best_of_n's workspace: none with packed keys; the pass-1 cut (num_groups * k keys) with two.
struct TopkPlan {
  Parts<1> parts;
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, int64_t k, size_t score_bytes,
                 TopkPlan* plan) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups || k < 1)
    return cudaErrorInvalidValue;
  if (best_of_n_two_pass(score_bytes, num_samples)) {
    plan->parts.sizes[0] = static_cast<size_t>(num_groups) * static_cast<size_t>(k) * sizeof(uint64_t);
  }
  return cudaSuccess;
}

// expected_best_of_k's workspace: values (fp64) and group keys (uint32), two buffers each, and
// cub's temporary storage for the larger of its two sorts.
struct ExpectedPlan {
  Parts<5> parts;
  int sort_bits;
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, ExpectedPlan* plan) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups)
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples);
  size_t* sizes = plan->parts.sizes;
  sizes[0] = sizes[1] = n * sizeof(double);
  sizes[2] = sizes[3] = n * sizeof(uint32_t);
  plan->sort_bits = group_key_bits(num_groups);
  size_t by_value = 0, by_group = 0;
  cudaError_t err = sort_temp_bytes<double, uint32_t>(
      num_samples, static_cast<int>(8 * sizeof(double)), &by_value);
  if (err != cudaSuccess) return err;
  err = sort_temp_bytes<uint32_t, double>(num_samples, plan->sort_bits, &by_group);
  if (err != cudaSuccess) return err;
  sizes[4] = by_value > by_group ? by_value : by_group;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------- pairs

// One thread per group over its segment: counts[g] its number of pairs (with offsets == nullptr),
// or writes them from offsets[g] on.
__global__ void __launch_bounds__(kThreads)
    pairs_kernel(const double* __restrict__ vals, const uint32_t* __restrict__ keys,
                 const int64_t* __restrict__ members, int64_t num_samples, int64_t num_groups,
                 double margin, const int64_t* __restrict__ offsets, int64_t max_pairs,
                 int64_t* __restrict__ counts, int64_t* __restrict__ chosen,
                 int64_t* __restrict__ rejected) {
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < num_groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t begin = segment_start(keys, num_samples, static_cast<uint32_t>(g));
    const int64_t end = segment_start(keys, num_samples, static_cast<uint32_t>(g + 1));
    if (offsets == nullptr) {
      counts[g] = selection::group_pairs(members + begin, end - begin, vals, margin, 0, 0,
                                         nullptr, nullptr);
    } else if (offsets[g] < max_pairs) {
      selection::group_pairs(members + begin, end - begin, vals, margin, offsets[g], max_pairs,
                             chosen, rejected);
    }
  }
}

// all_pairs' workspace: sort keys in/out (uint32), members in/out (int64), scores as fp64,
// per-group counts and offsets (int64), cub's storage for the larger of the sort and the scan.
struct PairsPlan {
  Parts<8> parts;
  int sort_bits;
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, PairsPlan* plan) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups)
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples), g = static_cast<size_t>(num_groups);
  size_t* sizes = plan->parts.sizes;
  sizes[0] = sizes[1] = n * sizeof(uint32_t);
  sizes[2] = sizes[3] = n * sizeof(int64_t);
  sizes[4] = n * sizeof(double);
  sizes[5] = sizes[6] = g * sizeof(int64_t);
  plan->sort_bits = group_key_bits(num_groups);
  size_t sort = 0, scan = 0;
  const cudaError_t err = sort_temp_bytes<uint32_t, int64_t>(num_samples, plan->sort_bits, &sort);
  if (err != cudaSuccess) return err;
  if (num_groups > 0) {
    const cudaError_t scan_err = cub::DeviceScan::ExclusiveSum(
        nullptr, scan, static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr),
        num_groups, nullptr);
    if (scan_err != cudaSuccess) return scan_err;
  }
  sizes[7] = sort > scan ? sort : scan;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------- maj@k

__global__ void __launch_bounds__(kThreads) iota_kernel(int64_t n, int64_t* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = i;
  }
}

// keys[p] = the sort key of sample idx[p]'s group (num_groups for an out-of-range id).
__global__ void __launch_bounds__(kThreads)
    gather_group_keys_kernel(const int64_t* __restrict__ group_ids, const int64_t* __restrict__ idx,
                             int64_t n, int64_t num_groups, uint32_t* __restrict__ keys) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = group_ids[idx[p]];
    keys[p] = static_cast<uint32_t>(g >= 0 && g < num_groups ? g : num_groups);
  }
}

// Group g's region of the DP workspace starts at (kc + 1) (5 begin + 6 g) doubles (begin: its
// segment's start): num and den (kc + 1 each), the binomial rows (A <= n of kmax + 1), two double
// buffers of D1 and D2 ((kmax + 1) (min(A, kmax) + 1) <= (kc + 1) (n + 1) each): at most
// (kc + 1) (5 n + 6) doubles, so the regions of consecutive groups never overlap.
// info[2 g] = n when row g was computed, -1 for a NaN row; info[2 g + 1] = the region's start.
constexpr int kWarp = 32;

__global__ void __launch_bounds__(kThreads)
    maj_dp_kernel(const int64_t* __restrict__ answer_ids, const bool* __restrict__ correct,
                  const int64_t* __restrict__ members, const uint32_t* __restrict__ keys,
                  int64_t num_samples, int64_t num_groups, int64_t k_max, int64_t kc,
                  int64_t* __restrict__ classes, int64_t* __restrict__ info,
                  double* __restrict__ ws) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t g = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       g < num_groups; g += warps) {  // warp-uniform: every lane of a warp has the same g
    const int64_t begin = segment_start(keys, num_samples, static_cast<uint32_t>(g));
    const int64_t end = segment_start(keys, num_samples, static_cast<uint32_t>(g + 1));
    const int64_t n = end - begin;
    const int64_t kmax = k_max < n ? k_max : n;
    const int64_t base = (kc + 1) * (5 * begin + 6 * g);
    int64_t* cls = classes + begin;
    int64_t A = 0;
    if (lane == 0 && kmax >= 1 && kmax <= selection::kMaxMajK) {
      // the segment is sorted by answer id: one class per run; -1 for a run with mixed correctness
      int64_t size = 0;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t i = members[p];
        ++size;
        if (p + 1 < end && answer_ids[members[p + 1]] == answer_ids[i]) {
          if (correct[members[p + 1]] != correct[i]) {
            A = -1;
            break;
          }
          continue;
        }
        cls[A++] = selection::maj_class(size, correct[i]);
        size = 0;
      }
    }
    A = __shfl_sync(0xffffffffu, A, 0);
    if (A <= 0) {  // empty, mixed or beyond kMaxMajK: a NaN row
      if (lane == 0) info[2 * g] = -1;
      continue;
    }
    __syncwarp();  // lane 0's classes are visible to the warp
    const int64_t K1 = kmax + 1;
    const int64_t Wmax = (A < kmax ? A : kmax) + 1;
    double* num = ws + base;
    double* den = num + kc + 1;
    double* chat = den + kc + 1;
    double* buf[4] = {chat + A * K1, chat + A * K1 + K1 * Wmax, chat + A * K1 + 2 * K1 * Wmax,
                      chat + A * K1 + 3 * K1 * Wmax};
    const double rho = selection::maj_scale(n, kmax);
    for (int64_t j = lane; j < A; j += kWarp) {
      selection::maj_binomial_row(selection::maj_class_size(cls[j]), kmax, rho, chat + j * K1);
    }
    for (int64_t k = lane; k < K1; k += kWarp) num[k] = den[k] = 0.0;
    for (int64_t t = 1; t <= kmax; ++t) {
      const int64_t W = selection::maj_width(cls, A, kmax, t);
      double *d1 = buf[0], *d2 = buf[1], *e1 = buf[2], *e2 = buf[3];
      for (int64_t p = lane; p < K1 * W; p += kWarp) {
        d1[p] = p == 0 ? 1.0 : 0.0;
        d2[p] = 0.0;
      }
      __syncwarp();
      for (int64_t j = 0; j < A; ++j) {
        const int64_t size = selection::maj_class_size(cls[j]);
        const bool ok = selection::maj_class_ok(cls[j]);
        for (int64_t p = lane; p < K1 * W; p += kWarp) {
          selection::maj_state(d1, d2, W, chat + j * K1, size, ok, t, p / W, p % W, e1 + p, e2 + p);
        }
        __syncwarp();
        double* tmp = d1;
        d1 = e1;
        e1 = tmp;
        tmp = d2;
        d2 = e2;
        e2 = tmp;
      }
      for (int64_t k = t + lane; k <= kmax; k += kWarp) {
        selection::maj_collect(d1, d2, W, k, num, den);
      }
      __syncwarp();  // before the next t overwrites the buffers
    }
    if (lane == 0) {
      info[2 * g] = n;
      info[2 * g + 1] = base;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    maj_write_kernel(const int64_t* __restrict__ info, const double* __restrict__ ws,
                     int64_t num_groups, int64_t kc, KChunk ks, double* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < num_groups * ks.num; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = i / ks.num, j = i % ks.num, k = ks.k[j];
    const int64_t n = info[2 * g];
    double v = NAN;
    if (n >= 0 && k <= n) {
      const double* num = ws + info[2 * g + 1];
      v = num[k] / num[kc + 1 + k];
    }
    out[g * ks.num_k + ks.first + j] = v;
  }
}

// maj_at_k's workspace: answers sorted (int64, discarded), member indices twice (int64), group
// keys in/out (uint32), classes (int64 per sample), info (2 int64 per group), the DP regions
// (fp64), cub's temporary storage for the larger of its two sorts.
struct MajPlan {
  Parts<9> parts;
  int sort_bits;
  int64_t kc;
};

cudaError_t plan(int64_t num_samples, int64_t num_groups, int64_t k_max, MajPlan* plan) {
  if (num_samples < 0 || num_groups < 0 || num_groups > kMaxSelectionGroups || k_max < 1)
    return cudaErrorInvalidValue;
  const size_t n = static_cast<size_t>(num_samples), g = static_cast<size_t>(num_groups);
  int64_t kc = k_max < num_samples ? k_max : num_samples;
  kc = kc < selection::kMaxMajK ? kc : selection::kMaxMajK;
  plan->kc = kc;
  size_t* sizes = plan->parts.sizes;
  sizes[0] = sizes[1] = sizes[2] = n * sizeof(int64_t);
  sizes[3] = sizes[4] = n * sizeof(uint32_t);
  sizes[5] = n * sizeof(int64_t);
  sizes[6] = 2 * g * sizeof(int64_t);
  sizes[7] = static_cast<size_t>(kc + 1) * (5 * n + 6 * g) * sizeof(double);
  plan->sort_bits = group_key_bits(num_groups);
  size_t by_answer = 0, by_group = 0;
  cudaError_t err = sort_temp_bytes<int64_t, int64_t>(
      num_samples, static_cast<int>(8 * sizeof(int64_t)), &by_answer);
  if (err != cudaSuccess) return err;
  err = sort_temp_bytes<uint32_t, int64_t>(num_samples, plan->sort_bits, &by_group);
  if (err != cudaSuccess) return err;
  sizes[8] = by_answer > by_group ? by_answer : by_group;
  return cudaSuccess;
}

}  // namespace

size_t best_of_n_workspace_bytes(int64_t num_samples, int64_t num_groups, int64_t k,
                                 size_t score_bytes) {
  TopkPlan p;
  if (plan(num_samples, num_groups, k, score_bytes, &p) != cudaSuccess) return 0;
  return p.parts.sizes[0] == 0 ? 0 : p.parts.total();
}

template <typename T>
cudaError_t launch_best_of_n(const T* scores, const int64_t* group_ids, int64_t num_samples,
                             int64_t num_groups, int64_t k, bool largest, int64_t* out,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  TopkPlan p;
  cudaError_t err = plan(num_samples, num_groups, k, sizeof(T), &p);
  if (err != cudaSuccess) return err;
  if (num_groups == 0) return cudaSuccess;
  const int64_t total = num_groups * k;
  err = cudaMemsetAsync(out, 0, static_cast<size_t>(total) * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  auto* lists = reinterpret_cast<unsigned long long*>(out);
  const bool two_pass = best_of_n_two_pass(sizeof(T), num_samples);
  if (num_samples > 0 && !two_pass) {
    cascade_kernel<Offer::kPacked, T><<<grid_for(num_samples), kThreads, 0, stream>>>(
        scores, group_ids, num_samples, num_groups, k, largest, nullptr, lists);
  } else if (num_samples > 0) {
    if (workspace == nullptr || workspace_bytes < p.parts.total()) return cudaErrorInvalidValue;
    auto* cut = static_cast<unsigned long long*>(p.parts.part(workspace, 0));
    err = cudaMemsetAsync(cut, 0, p.parts.sizes[0], stream);
    if (err != cudaSuccess) return err;
    cascade_kernel<Offer::kScore, T><<<grid_for(num_samples), kThreads, 0, stream>>>(
        scores, group_ids, num_samples, num_groups, k, largest, nullptr, cut);
    cascade_kernel<Offer::kIndex, T><<<grid_for(num_samples), kThreads, 0, stream>>>(
        scores, group_ids, num_samples, num_groups, k, largest, cut, lists);
  }
  decode_kernel<<<grid_for(total), kThreads, 0, stream>>>(out, total, !two_pass);
  return cudaGetLastError();
}

size_t expected_best_of_k_workspace_bytes(int64_t num_samples, int64_t num_groups) {
  ExpectedPlan p;
  return plan(num_samples, num_groups, &p) == cudaSuccess ? p.parts.total() : 0;
}

template <typename T>
cudaError_t launch_expected_best_of_k(const T* scores, const int64_t* group_ids,
                                      int64_t num_samples, int64_t num_groups, const int64_t* ks,
                                      int64_t num_k, bool replacement, bool largest, double* out,
                                      void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  ExpectedPlan p;
  cudaError_t err = plan(num_samples, num_groups, &p);
  if (err != cudaSuccess) return err;
  if (num_k < 1) return cudaErrorInvalidValue;
  for (int64_t j = 0; j < num_k; ++j) {
    if (ks[j] < 1) return cudaErrorInvalidValue;
  }
  if (num_groups == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < p.parts.total()) return cudaErrorInvalidValue;
  auto part = [&](int j) { return p.parts.part(workspace, j); };
  double* vals_in = static_cast<double*>(part(0));
  double* vals = static_cast<double*>(part(1));
  uint32_t* keys_in = static_cast<uint32_t*>(part(2));
  uint32_t* keys = static_cast<uint32_t*>(part(3));
  if (num_samples > 0) {
    sort_keys_kernel<<<grid_for(num_samples), kThreads, 0, stream>>>(group_ids, num_samples,
                                                                     num_groups, keys_in, nullptr);
    to_double_kernel<T><<<grid_for(num_samples), kThreads, 0, stream>>>(scores, num_samples,
                                                                        vals_in);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    // by value, then (stable LSD) by group: each group contiguous and ascending
    size_t temp_bytes = p.parts.sizes[4];
    err = cub::DeviceRadixSort::SortPairs(part(4), temp_bytes, vals_in, vals, keys_in, keys,
                                          num_samples, 0, static_cast<int>(8 * sizeof(double)),
                                          stream);
    if (err != cudaSuccess) return err;
    temp_bytes = p.parts.sizes[4];
    err = cub::DeviceRadixSort::SortPairs(part(4), temp_bytes, keys, keys_in, vals, vals_in,
                                          num_samples, 0, p.sort_bits, stream);
    if (err != cudaSuccess) return err;
  }
  for (int64_t first = 0; first < num_k; first += kKsPerLaunch) {
    const KChunk chunk = k_chunk(ks, num_k, first);
    expected_best_kernel<<<grid_for(num_groups), kThreads, 0, stream>>>(
        vals_in, keys_in, num_samples, num_groups, chunk, replacement, largest, out);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

size_t all_pairs_workspace_bytes(int64_t num_samples, int64_t num_groups) {
  PairsPlan p;
  return plan(num_samples, num_groups, &p) == cudaSuccess ? p.parts.total() : 0;
}

template <typename T>
cudaError_t launch_all_pairs(const T* scores, const int64_t* group_ids, int64_t num_samples,
                             int64_t num_groups, double margin, int64_t max_pairs, int64_t* chosen,
                             int64_t* rejected, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  PairsPlan p;
  cudaError_t err = plan(num_samples, num_groups, &p);
  if (err != cudaSuccess) return err;
  if (max_pairs < 0 || !(margin >= 0.0)) return cudaErrorInvalidValue;
  if (max_pairs == 0) return cudaSuccess;
  // all bytes 0xff: every int64 slot -1 until a pair lands there
  err = cudaMemsetAsync(chosen, 0xff, static_cast<size_t>(max_pairs) * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(rejected, 0xff, static_cast<size_t>(max_pairs) * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  if (num_groups == 0 || num_samples == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < p.parts.total()) return cudaErrorInvalidValue;
  auto part = [&](int j) { return p.parts.part(workspace, j); };
  uint32_t* keys_in = static_cast<uint32_t*>(part(0));
  uint32_t* keys = static_cast<uint32_t*>(part(1));
  int64_t* members_in = static_cast<int64_t*>(part(2));
  int64_t* members = static_cast<int64_t*>(part(3));
  double* vals = static_cast<double*>(part(4));
  int64_t* counts = static_cast<int64_t*>(part(5));
  int64_t* offsets = static_cast<int64_t*>(part(6));
  to_double_kernel<T><<<grid_for(num_samples), kThreads, 0, stream>>>(scores, num_samples, vals);
  err = sort_by_group(group_ids, num_samples, num_groups, p.sort_bits, keys_in, keys, members_in,
                      members, part(7), p.parts.sizes[7], stream);
  if (err != cudaSuccess) return err;
  pairs_kernel<<<grid_for(num_groups), kThreads, 0, stream>>>(
      vals, keys, members, num_samples, num_groups, margin, nullptr, 0, counts, nullptr, nullptr);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  size_t temp_bytes = p.parts.sizes[7];
  err = cub::DeviceScan::ExclusiveSum(part(7), temp_bytes, counts, offsets, num_groups, stream);
  if (err != cudaSuccess) return err;
  pairs_kernel<<<grid_for(num_groups), kThreads, 0, stream>>>(vals, keys, members, num_samples,
                                                              num_groups, margin, offsets,
                                                              max_pairs, nullptr, chosen, rejected);
  return cudaGetLastError();
}

size_t maj_at_k_workspace_bytes(int64_t num_samples, int64_t num_groups, int64_t k_max) {
  MajPlan p;
  return plan(num_samples, num_groups, k_max, &p) == cudaSuccess ? p.parts.total() : 0;
}

cudaError_t launch_maj_at_k(const int64_t* answer_ids, const bool* correct,
                            const int64_t* group_ids, int64_t num_samples, int64_t num_groups, const int64_t* ks,
                            int64_t num_k, double* out, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (num_k < 1) return cudaErrorInvalidValue;
  int64_t k_max = 0;
  for (int64_t j = 0; j < num_k; ++j) {
    if (ks[j] < 1) return cudaErrorInvalidValue;
    k_max = ks[j] > k_max ? ks[j] : k_max;
  }
  MajPlan p;
  cudaError_t err = plan(num_samples, num_groups, k_max, &p);
  if (err != cudaSuccess) return err;
  if (num_groups == 0) return cudaSuccess;
  if (workspace == nullptr || workspace_bytes < p.parts.total()) return cudaErrorInvalidValue;
  auto part = [&](int j) { return p.parts.part(workspace, j); };
  int64_t* answers = static_cast<int64_t*>(part(0));
  int64_t* idx_a = static_cast<int64_t*>(part(1));
  int64_t* idx_b = static_cast<int64_t*>(part(2));
  uint32_t* keys_in = static_cast<uint32_t*>(part(3));
  uint32_t* keys = static_cast<uint32_t*>(part(4));
  int64_t* classes = static_cast<int64_t*>(part(5));
  int64_t* info = static_cast<int64_t*>(part(6));
  double* dp = static_cast<double*>(part(7));
  if (num_samples > 0) {
    // by answer id, then (stable LSD) by group: each group contiguous, its answers grouped
    iota_kernel<<<grid_for(num_samples), kThreads, 0, stream>>>(num_samples, idx_a);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    size_t temp_bytes = p.parts.sizes[8];
    err = cub::DeviceRadixSort::SortPairs(part(8), temp_bytes, answer_ids, answers, idx_a, idx_b,
                                          num_samples, 0, static_cast<int>(8 * sizeof(int64_t)),
                                          stream);
    if (err != cudaSuccess) return err;
    gather_group_keys_kernel<<<grid_for(num_samples), kThreads, 0, stream>>>(
        group_ids, idx_b, num_samples, num_groups, keys_in);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    temp_bytes = p.parts.sizes[8];
    err = cub::DeviceRadixSort::SortPairs(part(8), temp_bytes, keys_in, keys, idx_b, idx_a,
                                          num_samples, 0, p.sort_bits, stream);
    if (err != cudaSuccess) return err;
  }
  maj_dp_kernel<<<grid_for(num_groups * kWarp), kThreads, 0, stream>>>(
      answer_ids, correct, idx_a, keys, num_samples, num_groups, k_max, p.kc, classes, info, dp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  for (int64_t first = 0; first < num_k; first += kKsPerLaunch) {
    const KChunk chunk = k_chunk(ks, num_k, first);
    maj_write_kernel<<<grid_for(num_groups * chunk.num), kThreads, 0, stream>>>(
        info, dp, num_groups, p.kc, chunk, out);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

#define FASTRL_INSTANTIATE(T)                                                                 \
  template cudaError_t launch_best_of_n<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, \
                                           bool, int64_t*, void*, size_t, cudaStream_t);        \
  template cudaError_t launch_expected_best_of_k<T>(const T*, const int64_t*, int64_t, int64_t,   \
                                                    const int64_t*, int64_t, bool, bool, double*, \
                                                    void*, size_t, cudaStream_t);        \
  template cudaError_t launch_all_pairs<T>(const T*, const int64_t*, int64_t, int64_t, double,    \
                                           int64_t, int64_t*, int64_t*, void*, size_t,            \
                                           cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
