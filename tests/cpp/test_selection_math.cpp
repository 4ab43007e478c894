// Host tests of best_of_n's packed keys and of the atomic-max cascade (csrc/include/fastrl/
// selection.h), the insert the CUDA kernel runs with atomicMax, alone and as the two cascades of
// its fp64 path. No GPU here, so the cascade is run
// (1) under a scheduler that interleaves the atomics of many offers in flight in random orders, the
// only freedom concurrent threads have, and (2) on real threads with std::atomic. Both must give
// every group's sorted top k, the brute-force answer. Built and run by CMakeLists.txt (ctest).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "check.h"
#include "fastrl/selection.h"

using namespace fastrl::selection;

namespace {

// Scores with many ties and the special values the keys must order.
std::vector<float> random_scores(std::mt19937_64& rng, int n) {
  static const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, 1e-45f, -1e-45f,
                                  std::numeric_limits<float>::max(), -1.5f};
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) {
    const int r = static_cast<int>(rng() % 10);
    x[i] = r < 2 ? special[rng() % 8] : r < 6 ? static_cast<float>(rng() % 5) : std::ldexp(static_cast<float>(rng() % 2001) - 1000.0f, -7);
  }
  return x;
}

// Brute force: indices sorted best first (higher score, then lower index; reversed scores for
// largest == false), the first k, -1 padded. Float: float or double scores.
template <typename Float>
std::vector<int64_t> brute_topk(const std::vector<Float>& x, int64_t k, bool largest) {
  std::vector<int64_t> idx(x.size());
  for (size_t i = 0; i < x.size(); ++i) idx[i] = static_cast<int64_t>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return largest ? x[a] > x[b] : x[a] < x[b];
  });
  std::vector<int64_t> out(k, -1);
  for (int64_t j = 0; j < k && j < static_cast<int64_t>(idx.size()); ++j) out[j] = idx[j];
  return out;
}

void test_key_order() {
  std::mt19937_64 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    const std::vector<float> x = random_scores(rng, 64);
    for (bool largest : {true, false}) {
      for (size_t a = 0; a < x.size(); ++a) {
        const uint64_t ka = member_key<uint64_t>(x[a], static_cast<int64_t>(a), largest);
        CHECK(ka != 0);
        CHECK(member_index(ka) == static_cast<int64_t>(a));
        for (size_t b = 0; b < x.size(); ++b) {
          const uint64_t kb = member_key<uint64_t>(x[b], static_cast<int64_t>(b), largest);
          // a ranks before b: a better score (higher, or lower with largest == false), or the
          // same score and a lower index
          const double ya = largest ? x[a] : -x[a], yb = largest ? x[b] : -x[b];
          CHECK((ka > kb) == ((ya > yb) || (ya == yb && a < b)));
        }
      }
    }
  }
  // the index bits: the last index of a 2^32 batch still gives a nonzero key
  const int64_t last = (int64_t{1} << 32) - 1;
  CHECK(member_key<uint64_t>(-INFINITY, last, true) != 0);
  CHECK(member_key<uint64_t>(INFINITY, last, false) != 0);
  CHECK(member_index(member_key<uint64_t>(2.0f, last, true)) == last);
  CHECK(member_index(uint64_t{0}) == -1);
  // the 128-bit keys of fp64 scores order as the 64-bit ones where both apply
  using Wide = unsigned __int128;
  CHECK((member_key<Wide>(1.0, 5, true) > member_key<Wide>(1.0, 6, true)));
  CHECK((member_key<Wide>(1.0 + 1e-15, 6, true) > member_key<Wide>(1.0, 5, true)));
  CHECK(member_index(member_key<Wide>(-3.0, int64_t{1} << 40, false)) == (int64_t{1} << 40));
}

// Runs cascade offers with their atomics interleaved at random: an offer in flight is (its next
// slot, its slots left, its carried key); a step picks one and applies one atomic max. New offers
// start at random steps. offers: (first slot, number of slots, key).
struct Offer {
  uint64_t* slot;
  int64_t left;
  uint64_t key;
};
void run_interleaved(std::vector<Offer> offers, std::mt19937_64& rng) {
  std::vector<Offer> flying;
  size_t started = 0;
  while (started < offers.size() || !flying.empty()) {
    if (started < offers.size() && (flying.empty() || rng() % 3 == 0)) {
      if (offers[started].left > 0) flying.push_back(offers[started]);
      ++started;
      continue;
    }
    const size_t f = rng() % flying.size();
    Offer& o = flying[f];
    const uint64_t old = *o.slot;
    *o.slot = std::max(old, o.key);  // one atomicMax
    o.key = std::min(old, o.key);
    ++o.slot;
    if (o.key == 0 || --o.left == 0) flying.erase(flying.begin() + f);
  }
}

void test_cascade_interleavings() {
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    const int64_t k = std::vector<int64_t>{1, 2, 3, 4, 7, 16}[rng() % 6];
    const bool largest = rng() % 2;
    const std::vector<float> x = random_scores(rng, n);
    std::vector<uint64_t> slots(k, 0);
    std::vector<Offer> offers;
    for (int i = 0; i < n; ++i) {
      offers.push_back({slots.data(), k, member_key<uint64_t>(x[i], i, largest)});
    }
    run_interleaved(offers, rng);
    const std::vector<int64_t> want = brute_topk(x, k, largest);
    for (int64_t j = 0; j < k; ++j) CHECK(member_index(slots[j]) == want[j]);
  }
}

// The two-cascade path (fp64 scores): pass 1 score keys into the cut, pass 2 index keys into the
// tie slots, each pass's atomics interleaved at random; fp64 values that fp32 would merge.
void test_two_cascades() {
  std::mt19937_64 rng(4);
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    const int64_t k = std::vector<int64_t>{1, 2, 3, 4, 7, 16}[rng() % 6];
    const bool largest = rng() % 2;
    const std::vector<float> base = random_scores(rng, n);
    std::vector<double> x(n);
    for (int i = 0; i < n; ++i) x[i] = rng() % 4 == 0 ? 1.0 + 1e-12 * static_cast<double>(rng() % 3) : base[i];
    std::vector<uint64_t> cut(k, 0), list(k, 0);
    std::vector<Offer> offers;
    for (int i = 0; i < n; ++i) offers.push_back({cut.data(), k, score_key(x[i], largest)});
    run_interleaved(offers, rng);
    for (int64_t j = 0; j + 1 < k; ++j) CHECK(cut[j] >= cut[j + 1]);
    offers.clear();
    for (int i = 0; i < n; ++i) {
      int64_t first = -1, count = -1;
      if (tie_slots(cut.data(), k, score_key(x[i], largest), &first, &count)) {
        CHECK(count >= 1 && first + count <= k);
        offers.push_back({list.data() + first, count, index_key(i)});
      }
    }
    run_interleaved(offers, rng);
    const std::vector<int64_t> want = brute_topk(x, k, largest);  // in fp64
    for (int64_t j = 0; j < k; ++j) CHECK(index_of(list[j]) == want[j]);
  }
  CHECK(index_of(index_key((int64_t{1} << 40) + 3)) == (int64_t{1} << 40) + 3);
  CHECK(index_of(0) == -1);
  CHECK(score_key(-INFINITY, true) != 0 && score_key(INFINITY, false) != 0);
  CHECK(score_key(-0.0, true) == score_key(0.0, true));
}

uint64_t atomic_max(std::atomic<uint64_t>* slot, uint64_t x) {
  uint64_t old = slot->load();
  while (old < x && !slot->compare_exchange_weak(old, x)) {
  }
  return old;
}

// Runs offer(i) for every i < n on 4 threads.
template <typename Offer>
void on_threads(int n, Offer offer) {
  const int threads = 4;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = t; i < n; i += threads) offer(i);
    });
  }
  for (auto& th : pool) th.join();
}

// The header's cascade_offer itself, on threads that share the slots: the packed keys, and the
// two cascades (fp64 scores, repeated score keys in pass 1) on the same scores.
void test_cascade_threads() {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const int groups = 1 + static_cast<int>(rng() % 8);
    const int n = 1 + static_cast<int>(rng() % 4000);
    const int64_t k = std::vector<int64_t>{1, 2, 4, 5, 16}[rng() % 5];
    const bool largest = rng() % 2;
    const std::vector<float> x = random_scores(rng, n);
    std::vector<int> group(n);
    for (int i = 0; i < n; ++i) group[i] = static_cast<int>(rng() % groups);
    const size_t total = static_cast<size_t>(groups * k);
    std::vector<std::atomic<uint64_t>> packed(total), cut(total), list(total);
    for (size_t j = 0; j < total; ++j) packed[j] = cut[j] = list[j] = 0;
    on_threads(n, [&](int i) {
      cascade_offer(packed.data() + group[i] * k, k, member_key<uint64_t>(x[i], i, largest),
                    atomic_max);
      cascade_offer(cut.data() + group[i] * k, k, score_key(x[i], largest), atomic_max);
    });
    std::vector<uint64_t> final_cut(total);
    for (size_t j = 0; j < total; ++j) final_cut[j] = cut[j].load();
    on_threads(n, [&](int i) {
      int64_t first = 0, count = 0;
      if (tie_slots(final_cut.data() + group[i] * k, k, score_key(x[i], largest), &first, &count)) {
        cascade_offer(list.data() + group[i] * k + first, count, index_key(i), atomic_max);
      }
    });
    for (int g = 0; g < groups; ++g) {
      std::vector<float> xs;
      std::vector<int64_t> members;
      for (int i = 0; i < n; ++i) {
        if (group[i] == g) {
          xs.push_back(x[i]);
          members.push_back(i);
        }
      }
      const std::vector<int64_t> want = brute_topk(xs, k, largest);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t expected = want[j] < 0 ? -1 : members[want[j]];
        CHECK(member_index(packed[g * k + j].load()) == expected);
        CHECK(index_of(list[g * k + j].load()) == expected);
      }
    }
  }
}

}  // namespace

int main() {
  test_key_order();
  test_cascade_interleavings();
  test_two_cascades();
  test_cascade_threads();
  return check_summary("test_selection_math");
}
