// CUDA kernel of token sampling (see cuda/sampling.cuh for the contract, fastrl/sampling.h for
// the math). One block of kThreads per row (grid-stride over rows), no sort, no [V] buffer: each
// pass re-reads the row, which warp w walks as one contiguous segment (16-byte loads when the row
// is 16-byte aligned), and recomputes z and e.
//
// Passes per row (a pass is one read of the row; the selects' later levels run in shared memory):
//   1. max of z, NaN check; with top-k also level 0 of its radix select: the histogram of the
//      counts over the first 11 bits of the keys of z (they do not depend on the max).
//   2. top-k: collect the bin holding the k-th largest z (keys and indices) into shared memory,
//      finish the select there. With top-p too, when the whole top-k set fits, collect it all and
//      run top-p's select over it in shared memory as well.
//   3. top-p otherwise: the histogram of the masses w over the first 11 bits of e (the top-k
//      set's w > 0), then a pass collecting the bin holding the threshold, finished likewise.
//   The row's last collect pass also sums, per warp segment, the raw mass and the mass of the
//   elements above the collected keys; the kept candidates' masses are added once the thresholds
//   are known (without truncation, or when a select never collected, one pass sums them instead).
//   Then the sampled token: the segment whose prefix crosses the target, split in kThreads chunks
//   (a sixteenth of the row, read twice).
// So top-k, or top-k + top-p when the top-k set fits in shared memory: 2 passes; top-p: 3. A bin too
// full for shared memory (many equal keys) is refined by one more histogram pass on the next
// digit. Histograms are warp-aggregated (one shared-memory atomic per distinct bin of a warp:
// most of a row falls in a few bins) and every sum is an integer (order free), so the results
// are bitwise reproducible, batch invariant, and equal to the CPU op's given the same uniforms
// wherever expf rounds alike.
#include <cuda_runtime.h>

#include "cuda/sampling.cuh"
#include "cuda/scalars.cuh"

namespace fastrl {
namespace cuda {
namespace {

using sampling::Thresholds;
using u64 = unsigned long long;  // the type of the 64-bit integer atomics

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kUnroll = 2;         // 16-byte loads in flight per thread in a pass
constexpr int kMaxBins = 2048;     // the radix digits of the 32-bit keys: 11, 11, 10 bits
constexpr int kLastLevel = 2;
constexpr int kCap = 2560;         // shared-memory candidates (static shared memory < 48 KiB)
constexpr uint32_t kNoBin = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

__device__ __forceinline__ int level_shift(int level) { return level == 0 ? 21 : level == 1 ? 10 : 0; }
__device__ __forceinline__ int level_bins(int level) { return level == kLastLevel ? 1024 : 2048; }
__device__ __forceinline__ uint32_t digit(uint32_t key, int level) {
  return (key >> level_shift(level)) & static_cast<uint32_t>(level_bins(level) - 1);
}
// Whether key has the digits of the levels before `level` that prefix holds.
__device__ __forceinline__ bool in_prefix(uint32_t key, uint32_t prefix, int level) {
  return level == 0 || (key >> level_shift(level - 1)) == (prefix >> level_shift(level - 1));
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// Element i of a 16-byte vector of T, as float.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ static float get(const uint4& v, int i) { return __uint_as_float(word(v, i)); }
};
template <>
struct Vec<double> {
  static constexpr int kN = 2;
  __device__ static float get(const uint4& v, int i) {
    return static_cast<float>(__hiloint2double(static_cast<int>(word(v, 2 * i + 1)), static_cast<int>(word(v, 2 * i))));
  }
};
template <>
struct Vec<__half> {
  static constexpr int kN = 8;
  __device__ static float get(const uint4& v, int i) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(word(v, i / 2) >> (16 * (i % 2)))));
  }
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static float get(const uint4& v, int i) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(word(v, i / 2) >> (16 * (i % 2)))));
  }
};

// z = x * (1 / T) rounded once (never contracted with the `- m` that follows: the CPU rounds both).
__device__ __forceinline__ float scale(float x, float inv_t) { return __fmul_rn(x, inv_t); }
// The order-preserving key of z for top-k (+ 0: -0 and +0 share a key).
__device__ __forceinline__ uint32_t z_key(float z) { return sampling::float_key(__float_as_uint(z + 0.0f)); }

// One row: `head` scalar elements up to the first 16-byte boundary, `nvec` 16-byte vectors, a
// scalar tail. Warp w owns the contiguous index range [seg_lo(w), seg_hi(w)): vectors
// [w * per_warp, (w + 1) * per_warp), plus the head for warp 0 and the tail for the last warp.
template <typename T>
struct Row {
  static constexpr int kN = Vec<T>::kN;
  const T* p;
  int64_t vocab, head, nvec, per_warp;

  __device__ Row(const T* row, int64_t n) : p(row), vocab(n) {
    const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) & 15);
    head = misaligned == 0 ? 0 : (16 - misaligned) / static_cast<int64_t>(sizeof(T));
    head = head < vocab ? head : vocab;
    nvec = (vocab - head) / kN;
    per_warp = (nvec + kWarps - 1) / kWarps;
  }
  __device__ int64_t seg_lo(int w) const {
    const int64_t v = w * per_warp;
    return w == 0 ? 0 : head + (v < nvec ? v : nvec) * kN;
  }
  __device__ int64_t seg_hi(int w) const { return w == kWarps - 1 ? vocab : seg_lo(w + 1); }
  __device__ int seg_of(int64_t j) const {
    if (j < head) return 0;
    const int64_t v = (j - head) / kN;
    return v >= nvec ? kWarps - 1 : static_cast<int>(v / per_warp);
  }
  __device__ float at(int64_t j) const { return to_float(p[j]); }

  // f(ok, j, x) for each element j of this thread's warp segment (x = float(row[j])), called by
  // all 32 lanes of the warp together (ok = false: a padding call, x is 0): f may use warp
  // intrinsics over the full warp.
  template <typename F>
  __device__ void for_each(F&& f) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp == 0 && head > 0) {
      const bool ok = lane < head;
      f(ok, static_cast<int64_t>(lane), ok ? at(lane) : 0.0f);
    }
    const uint4* vp = reinterpret_cast<const uint4*>(p + head);
    const int64_t v0 = warp * per_warp < nvec ? warp * per_warp : nvec;
    const int64_t v1 = v0 + per_warp < nvec ? v0 + per_warp : nvec;
    for (int64_t base = v0; base < v1; base += 32 * kUnroll) {  // the same trip count in every lane
      uint4 buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + u * 32 + lane;
        buf[u] = v < v1 ? __ldg(vp + v) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + u * 32 + lane;
#pragma unroll
        for (int i = 0; i < kN; ++i) f(v < v1, head + v * kN + i, Vec<T>::get(buf[u], i));
      }
    }
    const int64_t tail = head + nvec * kN;
    if (warp == kWarps - 1 && tail < vocab) {
      const int64_t j = tail + lane;
      f(j < vocab, j, j < vocab ? at(j) : 0.0f);
    }
  }
};

struct Shared {
  u64 hist_w[kMaxBins];        // masses per bin (top-p)
  unsigned hist_c[kMaxBins];   // element counts per bin
  uint32_t cand[kCap];         // keys of the candidates
  uint32_t cand_idx[kCap];     // their indices in the row
  u64 warp_u[kWarps];
  u64 seg_kept[kWarps], seg_raw[kWarps];
  float warp_f[kWarps];
  u64 pick_above;
  unsigned pick_bin, pick_count, n_cand;
  long long token;
};

__device__ __forceinline__ u64 warp_sum(u64 v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullWarp, v, o);
  return v;
}

// The exclusive prefix sum of v over the threads in order, and the block's total in every thread.
__device__ u64 block_exclusive_sum(u64 v, u64& total, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  u64 incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 n = __shfl_up_sync(kFullWarp, incl, o);
    incl += lane >= o ? n : 0;
  }
  if (lane == 31) sh.warp_u[warp] = incl;
  __syncthreads();
  u64 before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    const u64 s = sh.warp_u[w];
    before += w < warp ? s : 0;
    all += s;
  }
  __syncthreads();  // warp_u is reused
  total = all;
  return before + incl - v;
}

__device__ float block_max(float v, Shared& sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float n = __shfl_xor_sync(kFullWarp, v, o);
    v = n > v ? n : v;
  }
  if ((threadIdx.x & 31) == 0) sh.warp_f[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = sh.warp_f[0];
  for (int w = 1; w < kWarps; ++w) m = sh.warp_f[w] > m ? sh.warp_f[w] : m;
  __syncthreads();  // warp_f is reused
  return m;
}

// The sum of w over the lanes of `peers` (w <= 2^44, so each 22-bit half sums in 32 bits).
__device__ __forceinline__ u64 group_sum(unsigned peers, u64 w) {
#if __CUDA_ARCH__ >= 800
  const unsigned lo = __reduce_add_sync(peers, static_cast<unsigned>(w & 0x3fffffu));
  const unsigned hi = __reduce_add_sync(peers, static_cast<unsigned>(w >> 22));
  return (static_cast<u64>(hi) << 22) + lo;
#else
  u64 sum = 0;
  for (int src = 0; src < 32; ++src) {
    const u64 v = __shfl_sync(kFullWarp, w, src);
    sum += (peers >> src) & 1u ? v : 0;
  }
  return sum;
#endif
}

// Adds each ok lane's element (count 1, mass w) to bin `bin`, one atomic per distinct bin of the
// warp: the keys are concentrated (most of a row shares a few bins), and lanes hitting the same
// shared-memory word would serialize. Called by all 32 lanes together.
template <bool kWeighted>
__device__ __forceinline__ void hist_add(Shared& sh, bool ok, uint32_t bin, u64 w) {
  if (__ballot_sync(kFullWarp, ok) == 0) return;  // the same in every lane
  const unsigned peers = __match_any_sync(kFullWarp, ok ? bin : kNoBin);
  const bool leader = ok && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1;
  if (kWeighted) {
    const u64 mass = group_sum(peers, ok ? w : 0);
    if (leader) atomicAdd(&sh.hist_w[bin], mass);
  }
  if (leader) atomicAdd(&sh.hist_c[bin], static_cast<unsigned>(__popc(peers)));
}

__device__ void clear_hist(Shared& sh) {
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) {
    sh.hist_w[b] = 0;
    sh.hist_c[b] = 0;
  }
  __syncthreads();
}

// A radix select in progress: the largest key v such that the weight (count, or mass w) of the
// elements with key >= v reaches `target`. `prefix` holds the digits of the levels before `level`,
// `above` the weight of the elements whose key is above those digits. With top_p > 0 the target is
// top_p times the total weight, set when level 0's histogram is read.
struct Select {
  uint32_t prefix;
  int level;
  u64 above;
  double target;
  double top_p;
  unsigned count;  // elements in the chosen bin (after choose)
};

// Reads the histogram of s.level: the highest bin b whose weight, plus everything above it,
// reaches the target (bin 0 if none does, as the CPU's scan). Thread t scans bins
// [t * per, (t + 1) * per) from the top after a block scan of its chunk's weight; exactly one
// thread sees the crossing (the weights above a bin only grow from the top down).
template <bool kWeighted>
__device__ void choose(Select& s, Shared& sh) {
  const int bins = level_bins(s.level), per = bins / kThreads;
  const int top = bins - 1 - static_cast<int>(threadIdx.x) * per;
  auto weight = [&](int b) -> u64 { return kWeighted ? sh.hist_w[b] : sh.hist_c[b]; };
  u64 local = 0;
  for (int i = 0; i < per; ++i) local += weight(top - i);
  u64 total;
  u64 run = s.above + block_exclusive_sum(local, total, sh);
  if (s.top_p > 0.0 && s.level == 0) s.target = sampling::top_p_target(total, s.top_p);
  for (int i = 0; i < per; ++i) {
    const int b = top - i;
    const u64 wb = weight(b);
    if (!sampling::mass_reaches(run, s.target) && (b == 0 || sampling::mass_reaches(run + wb, s.target))) {
      sh.pick_bin = static_cast<unsigned>(b);
      sh.pick_above = run;
      sh.pick_count = sh.hist_c[b];
    }
    run += wb;
  }
  __syncthreads();
  s.prefix |= static_cast<uint32_t>(sh.pick_bin) << level_shift(s.level);
  s.above = sh.pick_above;
  s.count = sh.pick_count;
  __syncthreads();  // pick_* and the histogram are rewritten next
}

// Level s.level's histogram over the row: key_of(x, key, w) gives an element's key and weight and
// whether it takes part.
template <bool kWeighted, typename T, typename KeyOf>
__device__ void row_hist(const Row<T>& row, const KeyOf& key_of, const Select& s, Shared& sh) {
  clear_hist(sh);
  row.for_each([&](bool ok, int64_t, float x) {
    uint32_t key = 0;
    u64 w = 0;
    ok = ok && key_of(x, key, w) && in_prefix(key, s.prefix, s.level);
    hist_add<kWeighted>(sh, ok, digit(key, s.level), w);
  });
  __syncthreads();
}

// The same over the n shared-memory candidates: of(c, key, w) maps a candidate to its key/weight.
template <bool kWeighted, typename Of>
__device__ void cand_hist(const Of& of, int n, const Select& s, Shared& sh) {
  clear_hist(sh);
  for (int base = 0; base < n; base += kThreads) {  // the same trip count in every thread
    const int i = base + static_cast<int>(threadIdx.x);
    uint32_t key = 0;
    u64 w = 0;
    const bool ok = i < n && of(sh.cand[i], key, w) && in_prefix(key, s.prefix, s.level);
    hist_add<kWeighted>(sh, ok, digit(key, s.level), w);
  }
  __syncthreads();
}

// Whether a collect pass is the row's last: then it also sums, per warp segment, the raw mass of
// every element and the kept mass of the elements above the collected keys (kept by this select
// and the earlier ones, so kept unless min-p drops them); add_candidates adds the candidates' part.
struct Account {
  bool last;
  float inv_t, m;
  double min_p;
};

// Copies the keys and indices of the row's elements whose digits up to `level` equal prefix's
// (at_or_above: are >= prefix's, and none is above) into sh.cand; returns how many (the histogram
// said they fit).
template <typename T, typename KeyOf>
__device__ int collect(const Row<T>& row, const KeyOf& key_of, uint32_t prefix, int level, bool at_or_above,
                       const Account& acc, Shared& sh) {
  if (threadIdx.x == 0) sh.n_cand = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, shift = level_shift(level);
  const uint32_t ref = prefix >> shift;
  u64 kept_local = 0, raw_local = 0;
  row.for_each([&](bool in_row, int64_t j, float x) {
    uint32_t key = 0;
    u64 w = 0;
    const bool ok = in_row && key_of(x, key, w);
    const uint32_t top = key >> shift;
    const bool want = ok && (at_or_above ? top >= ref : top == ref);
    if (acc.last) {
      const float e = expf(scale(x, acc.inv_t) - acc.m);
      const u64 we = in_row ? sampling::to_fixed(e) : 0;
      raw_local += we;
      kept_local += ok && !at_or_above && top > ref && static_cast<double>(e) >= acc.min_p ? we : 0;
    }
    const unsigned ballot = __ballot_sync(kFullWarp, want);
    if (ballot == 0) return;  // the same in every lane
    unsigned base = 0;
    if (lane == 0) base = atomicAdd(&sh.n_cand, static_cast<unsigned>(__popc(ballot)));
    base = __shfl_sync(kFullWarp, base, 0);
    const unsigned slot = base + __popc(ballot & ((1u << lane) - 1u));
    if (want && slot < static_cast<unsigned>(kCap)) {  // always: the histogram counted these keys
      sh.cand[slot] = key;
      sh.cand_idx[slot] = static_cast<uint32_t>(j);
    }
  });
  if (acc.last) {
    kept_local = warp_sum(kept_local);
    raw_local = warp_sum(raw_local);
    if (lane == 0) {
      sh.seg_kept[threadIdx.x >> 5] = kept_local;
      sh.seg_raw[threadIdx.x >> 5] = raw_local;
    }
  }
  __syncthreads();
  const int n = sh.n_cand < static_cast<unsigned>(kCap) ? static_cast<int>(sh.n_cand) : kCap;
  __syncthreads();  // n_cand is reset by the next collect
  return n;
}

// After the row's last select: adds the kept mass kept_w(key) of each candidate to its segment.
template <typename T, typename KeptW>
__device__ void add_candidates(const Row<T>& row, const KeptW& kept_w, int n, Shared& sh) {
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const u64 w = kept_w(sh.cand[i]);
    if (w > 0) atomicAdd(&sh.seg_kept[row.seg_of(sh.cand_idx[i])], w);
  }
  __syncthreads();
}

// The candidates' keys as collected (top-p: w from the bits of e).
template <bool kWeighted>
struct Collected {
  __device__ bool operator()(uint32_t c, uint32_t& key, u64& w) const {
    key = c;
    w = kWeighted ? sampling::to_fixed(__uint_as_float(c)) : 1;
    return true;
  }
};

// Finishes a select over the shared candidates from s.level on.
template <bool kWeighted, typename Of>
__device__ uint32_t select_cands(const Of& of, int n, Select s, Shared& sh) {
  for (;; ++s.level) {
    cand_hist<kWeighted>(of, n, s, sh);
    choose<kWeighted>(s, sh);
    if (s.level == kLastLevel) return s.prefix;
  }
}

// A finished select: the key found, and how many candidates the last pass collected (-1: none,
// the key was resolved by histogram passes alone).
struct Found {
  uint32_t key;
  int n;
};

// Finishes a select over the row whose bin at s.level is chosen: one more histogram pass per
// level while the chosen bin is too full for shared memory, then one pass collecting it.
template <bool kWeighted, typename T, typename KeyOf>
__device__ Found finish_row(const Row<T>& row, const KeyOf& key_of, Select s, const Account& acc, Shared& sh) {
  for (;;) {
    if (s.level == kLastLevel) return Found{s.prefix, -1};
    if (s.count <= static_cast<unsigned>(kCap)) {
      const int n = collect(row, key_of, s.prefix, s.level, false, acc, sh);
      ++s.level;
      return Found{select_cands<kWeighted>(Collected<kWeighted>{}, n, s, sh), n};
    }
    ++s.level;
    row_hist<kWeighted>(row, key_of, s, sh);
    choose<kWeighted>(s, sh);
  }
}

// Top-k: the keys of z, weight 1 (counts).
struct TopKKey {
  float inv_t;
  __device__ bool operator()(float x, uint32_t& key, u64& w) const {
    key = z_key(scale(x, inv_t));
    w = 1;
    return true;
  }
};

// Top-p: the bits of e (ordered: e >= 0), weight w, over the top-k set's elements with w > 0.
struct TopPKey {
  float inv_t, m, z_min;
  __device__ bool of_z(float z, uint32_t& key, u64& w) const {
    const float e = expf(z - m);
    key = __float_as_uint(e);
    w = sampling::to_fixed(e);
    return w > 0 && z >= z_min;
  }
  __device__ bool operator()(float x, uint32_t& key, u64& w) const { return of_z(scale(x, inv_t), key, w); }
  // The same from a candidate holding z's top-k key (z_key(z) gives back z, up to the sign of 0,
  // which changes neither e nor z >= z_min).
  __device__ bool of_key(uint32_t c, uint32_t& key, u64& w) const {
    return of_z(__uint_as_float(sampling::key_bits(c)), key, w);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    sample_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                  const double* __restrict__ uniforms, sampling::ParamSource params, int64_t* __restrict__ tokens,
                  float* __restrict__ logprobs, float* __restrict__ raw_logprobs) {
  __shared__ Shared sh;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const Row<T> row(logits + r * row_stride, vocab);
    const sampling::RowParams prm = sampling::row_params(params, r);
    if (!sampling::params_valid(prm)) {  // the same in every thread
      if (threadIdx.x == 0) {
        tokens[r] = -1;
        logprobs[r] = raw_logprobs[r] = NAN;
      }
      continue;
    }
    const float inv_t = sampling::inv_temperature(prm);
    const bool top_k = prm.top_k < vocab, top_p = prm.top_p < 1.0;

    // Pass 1: max, NaN; with top-k, level 0 of its select (keys of z do not depend on the max).
    if (top_k) clear_hist(sh);
    float m_local = -INFINITY;
    int nan_local = 0;
    row.for_each([&](bool ok, int64_t, float x) {
      const float z = scale(x, inv_t);
      m_local = ok && z > m_local ? z : m_local;
      nan_local |= ok && z != z;
      if (top_k) hist_add<false>(sh, ok, digit(z_key(z), 0), 1);
    });
    const bool any_nan = __syncthreads_or(nan_local) != 0;
    const float m = block_max(m_local, sh);  // its barriers also publish the histogram
    if (!sampling::row_valid(m, any_nan)) {
      if (threadIdx.x == 0) {
        tokens[r] = -1;
        logprobs[r] = raw_logprobs[r] = NAN;
      }
      continue;
    }

    // The selects; the row's last collect pass also sums the kept and raw masses per segment.
    Thresholds th{-INFINITY, 0.0f, prm.min_p};
    const Account last{true, inv_t, m, prm.min_p}, not_last{false, inv_t, m, prm.min_p};
    auto z_kept = [&](uint32_t c) -> u64 {  // a candidate holding z's key
      const float z = __uint_as_float(sampling::key_bits(c));
      const float e = expf(z - m);
      return sampling::kept(z, e, th) ? sampling::to_fixed(e) : 0;
    };
    bool top_p_done = false, accounted = false;
    if (top_k) {
      const TopKKey key_of{inv_t};
      Select s{0, 0, 0, static_cast<double>(prm.top_k), 0.0, 0};
      choose<false>(s, sh);
      if (top_p && s.above + s.count <= static_cast<u64>(kCap)) {
        // The whole top-k set fits: collect every bin from the chosen one up, finish both selects
        // in shared memory.
        const int n = collect(row, key_of, s.prefix, 0, true, last, sh);
        ++s.level;
        th.z_min = __uint_as_float(sampling::key_bits(select_cands<false>(Collected<false>{}, n, s, sh)));
        const TopPKey p_of{inv_t, m, th.z_min};
        const Select sp{0, 0, 0, 0.0, prm.top_p, 0};
        th.e_min = __uint_as_float(select_cands<true>(
            [&](uint32_t c, uint32_t& k, u64& w) { return p_of.of_key(c, k, w); }, n, sp, sh));
        add_candidates(row, z_kept, n, sh);
        top_p_done = accounted = true;
      } else {
        const Found f = finish_row<false>(row, key_of, s, top_p ? not_last : last, sh);
        th.z_min = __uint_as_float(sampling::key_bits(f.key));
        if (!top_p && f.n >= 0) {
          add_candidates(row, z_kept, f.n, sh);
          accounted = true;
        }
      }
    }
    if (top_p && !top_p_done) {
      const TopPKey key_of{inv_t, m, th.z_min};
      Select s{0, 0, 0, 0.0, prm.top_p, 0};
      row_hist<true>(row, key_of, s, sh);
      choose<true>(s, sh);
      const Found f = finish_row<true>(row, key_of, s, last, sh);
      th.e_min = __uint_as_float(f.key);
      if (f.n >= 0) {
        // A candidate holding e's bits was collected with z >= z_min.
        add_candidates(row, [&](uint32_t c) -> u64 {
          const float e = __uint_as_float(c);
          return sampling::kept(INFINITY, e, th) ? sampling::to_fixed(e) : 0;
        }, f.n, sh);
        accounted = true;
      }
    }

    const bool truncated = sampling::truncates(th);
    auto kept_w = [&](float x) -> u64 {
      const float z = scale(x, inv_t);
      const float e = expf(z - m);
      return !truncated || sampling::kept(z, e, th) ? sampling::to_fixed(e) : 0;
    };
    if (!accounted) {  // no select, or one resolved without collecting: a pass for the masses
      u64 kept_local = 0, raw_local = 0;
      row.for_each([&](bool ok, int64_t, float x) {
        const float z = scale(x, inv_t);
        const float e = expf(z - m);
        const u64 w = ok ? sampling::to_fixed(e) : 0;
        raw_local += w;
        kept_local += !truncated || sampling::kept(z, e, th) ? w : 0;
      });
      kept_local = warp_sum(kept_local);
      raw_local = warp_sum(raw_local);
      if (lane == 0) {
        sh.seg_kept[warp] = kept_local;
        sh.seg_raw[warp] = raw_local;
      }
      __syncthreads();
    }
    u64 kept_mass = 0, raw = 0;
    for (int w = 0; w < kWarps; ++w) {
      kept_mass += sh.seg_kept[w];
      raw += sh.seg_raw[w];
    }
    const u64 target = sampling::sample_target(uniforms[r], kept_mass);

    // Pass 5 (over one segment): the first j whose inclusive prefix of kept w exceeds target. The
    // segment holding it, then the thread's chunk holding it (exactly one thread has exclusive
    // prefix <= target < its inclusive prefix), then its element.
    int seg = 0;
    u64 before = 0;
    for (; seg < kWarps - 1 && before + sh.seg_kept[seg] <= target; ++seg) before += sh.seg_kept[seg];
    const int64_t lo = row.seg_lo(seg), hi = row.seg_hi(seg);
    const int64_t chunk = (hi - lo + kThreads - 1) / kThreads;
    const int64_t a0 = lo + threadIdx.x * chunk;
    const int64_t a = a0 < hi ? a0 : hi, b = a + chunk < hi ? a + chunk : hi;
    u64 mine = 0;
    for (int64_t j = a; j < b; ++j) mine += kept_w(row.at(j));
    if (threadIdx.x == 0) sh.token = -1;  // written below only after the scan's barriers
    u64 seg_total;
    const u64 excl = before + block_exclusive_sum(mine, seg_total, sh);
    if (excl <= target && target < excl + mine) {
      u64 run = excl;
      for (int64_t j = a; j < b; ++j) {
        const u64 w = kept_w(row.at(j));
        if (run + w > target) {
          sh.token = j;
          break;
        }
        run += w;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t y = sh.token;
      if (y < 0) {  // not reached: the masses above are exact, so the chunk holding target exists
        tokens[r] = -1;
        logprobs[r] = raw_logprobs[r] = NAN;
      } else {
        const float zy = scale(row.at(y), inv_t) - m;
        tokens[r] = y;
        logprobs[r] = sampling::token_logprob(zy, kept_mass);
        raw_logprobs[r] = sampling::token_logprob(zy, raw);
      }
    }
    __syncthreads();  // sh.token, seg_* are reused by the next row
  }
}

}  // namespace

template <typename T>
cudaError_t launch_sample_tokens(const T* logits, int64_t row_stride, int64_t num_rows, int64_t vocab,
                                 const double* uniforms, const sampling::ParamSource& params, int64_t* tokens,
                                 float* logprobs, float* raw_logprobs, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  const int64_t blocks = num_rows < kMaxBlocks ? num_rows : kMaxBlocks;
  sample_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      logits, row_stride, num_rows, vocab, uniforms, params, tokens, logprobs, raw_logprobs);
  return cudaGetLastError();
}

#define FASTRL_INSTANTIATE(T)                                                                          \
  template cudaError_t launch_sample_tokens<T>(const T*, int64_t, int64_t, int64_t, const double*,     \
                                               const sampling::ParamSource&, int64_t*, float*, float*, \
                                               cudaStream_t);
FASTRL_INSTANTIATE(float)
FASTRL_INSTANTIATE(double)
FASTRL_INSTANTIATE(__half)
FASTRL_INSTANTIATE(__nv_bfloat16)
#undef FASTRL_INSTANTIATE

}  // namespace cuda
}  // namespace fastrl
