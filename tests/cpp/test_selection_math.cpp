// Host tests of best_of_n's packed keys and of the atomic-max cascade (csrc/include/fastrl/
// selection.h), the insert the CUDA kernel runs with atomicMax. No GPU here, so the cascade is run
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
// largest == false), the first k, -1 padded.
std::vector<int64_t> brute_topk(const std::vector<float>& x, int64_t k, bool largest) {
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
          const double ya = topk_key(x[a], largest), yb = topk_key(x[b], largest);
          CHECK((ka > kb) == ranks_before(ya, static_cast<int64_t>(a), yb, static_cast<int64_t>(b)));
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

// Every offer's atomics interleaved at random: an offer in flight is (its slot, its carried key);
// a step picks one and applies one atomic max. New offers start at random steps.
void test_cascade_interleavings() {
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = 1 + static_cast<int>(rng() % 40);
    const int64_t k = std::vector<int64_t>{1, 2, 3, 4, 7, 16}[rng() % 6];
    const bool largest = rng() % 2;
    const std::vector<float> x = random_scores(rng, n);
    std::vector<uint64_t> slots(k, 0);
    struct Offer {
      int64_t slot;
      uint64_t key;
    };
    std::vector<Offer> flying;
    int started = 0;
    while (started < n || !flying.empty()) {
      if (started < n && (flying.empty() || rng() % 3 == 0)) {
        flying.push_back({0, member_key<uint64_t>(x[started], started, largest)});
        ++started;
        continue;
      }
      const size_t f = rng() % flying.size();
      Offer& o = flying[f];
      const uint64_t old = slots[o.slot];
      slots[o.slot] = std::max(old, o.key);  // one atomicMax
      o.key = std::min(old, o.key);
      ++o.slot;
      if (o.key == 0 || o.slot == k) flying.erase(flying.begin() + f);
    }
    const std::vector<int64_t> want = brute_topk(x, k, largest);
    for (int64_t j = 0; j < k; ++j) CHECK(member_index(slots[j]) == want[j]);
  }
}

// The header's cascade_offer itself, on threads that share the slots.
void test_cascade_threads() {
  std::mt19937_64 rng(3);
  auto atomic_max = [](std::atomic<uint64_t>* slot, uint64_t x) {
    uint64_t old = slot->load();
    while (old < x && !slot->compare_exchange_weak(old, x)) {
    }
    return old;
  };
  for (int trial = 0; trial < 200; ++trial) {
    const int groups = 1 + static_cast<int>(rng() % 8);
    const int n = 1 + static_cast<int>(rng() % 4000);
    const int64_t k = std::vector<int64_t>{1, 2, 4, 5, 16}[rng() % 5];
    const bool largest = rng() % 2;
    const std::vector<float> x = random_scores(rng, n);
    std::vector<int> group(n);
    for (int i = 0; i < n; ++i) group[i] = static_cast<int>(rng() % groups);
    std::vector<std::atomic<uint64_t>> slots(static_cast<size_t>(groups * k));
    for (auto& s : slots) s.store(0);
    const int threads = 4;
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (int i = t; i < n; i += threads) {
          cascade_offer(slots.data() + group[i] * k, k, member_key<uint64_t>(x[i], i, largest),
                        atomic_max);
        }
      });
    }
    for (auto& th : pool) th.join();
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
        const int64_t got = member_index(slots[g * k + j].load());
        CHECK(got == (want[j] < 0 ? -1 : members[want[j]]));
      }
    }
  }
}

}  // namespace

int main() {
  test_key_order();
  test_cascade_interleavings();
  test_cascade_threads();
  return check_summary("test_selection_math");
}
