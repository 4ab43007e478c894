// torch binding of the exact masked quantile (fastrl.sampling.quantile_mask):
//   quantile_mask(x, mask, q) -> (keep, t)   t = torch.quantile(x[mask], q) bitwise (NaN if a
//                                            masked value is NaN or none is masked), with no
//                                            2^24 limit; keep = mask & (x >= t)
// CUDA: a radix select (cuda/quantile.cuh), no host sync. CPU: the same radix select, pass for
// pass, on the host (fastrl/quantile.h shares the keys, digits and ranks), then torch's own lerp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <tuple>
#include <vector>

#include "fastrl/quantile.h"
#include "torch/checks.h"
#ifdef FASTRL_WITH_CUDA
#include "torch/cuda_dispatch.h"
#include "cuda/quantile.cuh"
#endif

namespace fastrl {
namespace {

struct Inputs {
  at::Tensor x, mask;  // contiguous
};

Inputs check_inputs(const at::Tensor& x, const at::Tensor& mask, double q) {
  check_floating(x, "x");
  check_mask_dtype(mask);
  TORCH_CHECK(mask.sizes() == x.sizes(), "fastrl: `mask` has shape ", mask.sizes(),
              " but `x` has shape ", x.sizes());
  check_same_device(mask, "mask", x, "x");
  TORCH_CHECK_VALUE(q >= 0.0 && q <= 1.0, "fastrl: `q` must lie in [0, 1], got ", q);
  return {x.contiguous(), mask.contiguous()};
}

// The dtype t is computed and returned in: float32 for half inputs (as TRL compares), else x's.
at::ScalarType value_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The order statistics of the selected values: is_nan when one of them is NaN or there is none,
// else the lo-th and hi-th values and the weight of fastrl/quantile.h's ranks.
template <typename V>
struct OrderStats {
  bool is_nan;
  V lo, hi, frac;
};

// Runs f(begin, end, chunk) over fixed chunks of [0, n) in parallel: per-chunk partial results
// merged in chunk order do not depend on the thread count.
constexpr int64_t kChunk = int64_t{1} << 16;
int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }
template <typename F>
void for_chunks(int64_t n, const F& f) {
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c * kChunk, std::min(n, (c + 1) * kChunk), c);
  });
}

// The CUDA kernels' radix select (cuda/quantile.cu), pass for pass, on the host: per 8-bit digit
// of the keys, the histogram of the candidates (per chunk, summed in chunk order), then the digit
// holding the remaining rank; then the hi-th value (a copy of the lo-th or the least key above).
template <typename V, typename T, typename M>
OrderStats<V> masked_order_stats(const T* x, const M* mask, int64_t n, double q) {
  using K = typename quantile::KeyOf<V>::type;
  using Hist = std::array<uint64_t, quantile::kBins>;
  K prefix = 0;
  uint64_t rank = 0, copies = 0;
  quantile::Ranks<V> r{0, 0, V(0)};
  for (int pass = 0; pass < quantile::num_passes<K>(); ++pass) {
    const int shift = quantile::pass_shift<K>(pass);
    std::vector<Hist> hists(num_chunks(n), Hist{});
    std::vector<char> nans(hists.size(), 0);
    for_chunks(n, [&](int64_t begin, int64_t end, int64_t c) {
      for (int64_t i = begin; i < end; ++i) {
        if (mask[i] == M(0)) continue;
        const V v = static_cast<V>(x[i]);
        nans[c] |= v != v;
        const K key = quantile::key_of(v);
        if (quantile::is_candidate(key, prefix, shift)) ++hists[c][quantile::digit_of(key, shift)];
      }
    });
    Hist hist{};
    for (const Hist& h : hists) {
      for (int b = 0; b < quantile::kBins; ++b) hist[b] += h[b];
    }
    if (pass == 0) {
      uint64_t count = 0;
      for (const uint64_t c : hist) count += c;
      if (count == 0 || std::find(nans.begin(), nans.end(), 1) != nans.end()) {
        const V nan = std::numeric_limits<V>::quiet_NaN();
        return {true, nan, nan, nan};
      }
      r = quantile::ranks<V>(static_cast<int64_t>(count), q);
      rank = static_cast<uint64_t>(r.lo);
    }
    int b = 0;
    for (; b + 1 < quantile::kBins && rank >= hist[b]; ++b) rank -= hist[b];  // rank < candidates
    prefix |= static_cast<K>(b) << shift;
    copies = hist[b];
  }
  const V lo = quantile::value_of<V>(prefix);
  if (!quantile::hi_is_next_key(r.lo, r.hi, rank, copies)) return {false, lo, lo, r.frac};
  std::vector<K> least(num_chunks(n), std::numeric_limits<K>::max());
  for_chunks(n, [&](int64_t begin, int64_t end, int64_t c) {
    for (int64_t i = begin; i < end; ++i) {
      if (mask[i] == M(0)) continue;
      const K key = quantile::key_of(static_cast<V>(x[i]));
      if (key > prefix && key < least[c]) least[c] = key;
    }
  });
  return {false, lo, quantile::value_of<V>(*std::min_element(least.begin(), least.end())), r.frac};
}

std::tuple<at::Tensor, at::Tensor> quantile_mask_cpu(const at::Tensor& x, const at::Tensor& mask,
                                                     double q) {
  const Inputs in = check_inputs(x, mask, q);
  const int64_t n = in.x.numel();
  at::Tensor keep = at::empty(in.x.sizes(), in.x.options().dtype(at::kBool));
  at::Tensor t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(),
                                  "fastrl::quantile_mask", [&] {
    using V = quantile::value_t<scalar_t>;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      const scalar_t* xp = in.x.data_ptr<scalar_t>();
      const mask_t* mp = in.mask.data_ptr<mask_t>();
      const OrderStats<V> s = masked_order_stats<V>(xp, mp, n, q);
      const auto options = in.x.options().dtype(value_dtype(in.x));
      // torch.quantile interpolates with torch.lerp: call it, for its bits
      t = s.is_nan ? at::full({}, s.lo, options)
                   : at::lerp(at::scalar_tensor(s.lo, options), at::scalar_tensor(s.hi, options),
                              at::scalar_tensor(s.frac, options));
      const V tv = t.item<V>();
      bool* out = keep.data_ptr<bool>();
      at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) out[i] = mp[i] != mask_t(0) && static_cast<V>(xp[i]) >= tv;
      });
    });
  });
  return {keep, t};
}

#ifdef FASTRL_WITH_CUDA
// The CPU op's order statistics, interpolated as torch's CUDA lerp (torch.quantile's bits on the
// GPU), with no host sync. Extra memory: a fixed 16.6 KiB workspace.
std::tuple<at::Tensor, at::Tensor> quantile_mask_cuda(const at::Tensor& x, const at::Tensor& mask,
                                                      double q) {
  const Inputs in = check_inputs(x, mask, q);
  const c10::cuda::CUDAGuard guard(in.x.device());
  at::Tensor keep = at::empty(in.x.sizes(), in.x.options().dtype(at::kBool));
  at::Tensor t = at::empty({}, in.x.options().dtype(value_dtype(in.x)));
  constexpr size_t bytes = cuda::kQuantileWorkspaceBytes;
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, in.x.options().dtype(at::kByte));
  cudaError_t err = cudaSuccess;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(),
                                  "fastrl::quantile_mask", [&] {
    using cuda_t = typename CudaScalar<scalar_t>::type;
    using V = quantile::value_t<cuda_t>;
    FASTRL_DISPATCH_MASK(in.mask.scalar_type(), [&] {
      err = cuda::launch_quantile_mask<cuda_t, mask_t>(
          reinterpret_cast<const cuda_t*>(in.x.data_ptr<scalar_t>()), in.mask.data_ptr<mask_t>(),
          in.x.numel(), q, keep.data_ptr<bool>(), t.data_ptr<V>(), workspace.data_ptr(), bytes,
          stream_of(in.x));
    });
  });
  C10_CUDA_CHECK(err);
  return {keep, t};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastrl, m) {
  m.def("quantile_mask(Tensor x, Tensor mask, float q) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrl, CPU, m) { m.impl("quantile_mask", &quantile_mask_cpu); }

#ifdef FASTRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fastrl, CUDA, m) { m.impl("quantile_mask", &quantile_mask_cuda); }
#endif

}  // namespace fastrl
