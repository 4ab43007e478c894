// Host tests of the token-level math shared by the CPU and CUDA kernels: the affine recurrences of
// fastrl/credit.h (the CUDA scan relies on their associativity) and the online softmax state of
// fastrl/logprobs.h (the kernels merge row pieces in a fixed order). Built and run by ctest.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "fastrl/credit.h"
#include "fastrl/logprobs.h"

namespace {

using fastrl::credit::Affine;

// A backward scan composes the steps of positions T-1 .. 0; grouping the composition differently
// (what a parallel scan does) must give the same map up to rounding.
void test_affine_composition_is_associative() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int trial = 0; trial < 100; ++trial) {
    const Affine<double> a{u(rng), u(rng)}, b{u(rng), u(rng)}, c{u(rng), u(rng)};
    const auto left = fastrl::credit::then(fastrl::credit::then(a, b), c);
    const auto right = fastrl::credit::then(a, fastrl::credit::then(b, c));
    CHECK_NEAR(left.c, right.c, 1e-14);
    CHECK_NEAR(left.d, right.d, 1e-14);
    const double x = u(rng);
    CHECK_NEAR(fastrl::credit::apply(left, x),
               fastrl::credit::apply(c, fastrl::credit::apply(b, fastrl::credit::apply(a, x))), 1e-14);
  }
  const auto id = fastrl::credit::identity<double>();
  const Affine<double> f{0.5, 2.0};
  CHECK(fastrl::credit::then(id, f).c == f.c && fastrl::credit::then(id, f).d == f.d);
  CHECK(fastrl::credit::then(f, id).c == f.c && fastrl::credit::then(f, id).d == f.d);
}

// GAE over one row with masked (transparent) positions, by the header's steps, equals the textbook
// recurrence written out (verl's loop).
void test_gae_row_matches_recurrence() {
  const std::vector<double> r = {0.1, -0.2, 0.0, 0.3, 1.0, 0.0};
  const std::vector<double> v = {0.5, 0.4, 9.0, 0.2, 0.1, 7.0};
  const std::vector<bool> valid = {true, true, false, true, true, false};
  const double gamma = 0.9, lam = 0.8;
  const int T = static_cast<int>(r.size());
  std::vector<double> expect(T);
  double next_v = 0.0, carry = 0.0;
  for (int t = T - 1; t >= 0; --t) {  // verl: masked tokens keep the carry and the next value
    if (valid[t]) {
      carry = r[t] + gamma * next_v - v[t] + gamma * lam * carry;
      next_v = v[t];
    }
    expect[t] = carry;
  }
  double nv = 0.0, got = 0.0;
  for (int t = T - 1; t >= 0; --t) {
    const auto step = fastrl::credit::gae_step(r[t], v[t], nv, valid[t], gamma, gamma * lam);
    got = fastrl::credit::apply(step, got);
    nv = fastrl::credit::next_value(static_cast<bool>(valid[t]), v[t], nv);
    CHECK_NEAR(got, expect[t], 1e-12);
  }
}

// The row's maps composed in two chunks (what the CUDA tile scan does): [split, T) composed, then
// [0, split) continued from that composite; the carry at t is the composite's d.
void check_two_chunks(const std::vector<fastrl::credit::Affine<double>>& f,
                      const std::vector<double>& expect, int split) {
  auto acc = fastrl::credit::identity<double>();
  for (int t = static_cast<int>(f.size()) - 1; t >= split; --t) acc = fastrl::credit::then(acc, f[t]);
  for (int t = split - 1; t >= 0; --t) {
    acc = fastrl::credit::then(acc, f[t]);
    CHECK_NEAR(acc.d, expect[t], 1e-12);
  }
}

// GAE with turn ends and a gap mode, by the header's steps: (a) sequentially equals the textbook
// recurrence with per-position (gamma, lambda) written out, and (b) composing the row's maps in two
// chunks (what the CUDA tile scan does) gives the same advantages up to rounding.
void test_gae_turn_steps() {
  const std::vector<double> r = {0.1, -0.2, 0.0, 0.3, 1.0, 0.0, 0.5};
  const std::vector<double> v = {0.5, 0.4, 9.0, 0.2, 0.1, 7.0, 0.3};
  const std::vector<bool> valid = {true, true, false, true, true, false, true};
  const std::vector<bool> done = {false, false, true, true, false, false, false};  // t=2 masked: ends t=1
  const double gamma = 0.9, lam = 0.8, tg = 0.5, tl = 0.6;
  const fastrl::credit::GaeCoefs<double> k{gamma, gamma * lam, tg, tg * tl};
  const int T = static_cast<int>(r.size());
  for (auto mode : {fastrl::credit::GaeMode::kSkip, fastrl::credit::GaeMode::kReset}) {
    const bool reset = mode == fastrl::credit::GaeMode::kReset;
    std::vector<double> expect(T), got(T);
    double nv = 0.0, carry = 0.0;
    bool pending = false;
    for (int t = T - 1; t >= 0; --t) {  // written out
      if (valid[t]) {
        const bool end = done[t] || pending;
        const double g = end ? tg : gamma, l = end ? tl : lam;
        carry = r[t] + g * nv - v[t] + g * l * carry;
        nv = v[t];
        pending = false;
      } else {
        if (reset) carry = nv = 0.0;
        pending = pending || done[t];
      }
      expect[t] = carry;
    }
    std::vector<fastrl::credit::Affine<double>> f(T);
    nv = 0.0;
    carry = 0.0;
    pending = false;
    for (int t = T - 1; t >= 0; --t) {  // the header's steps
      if (valid[t]) {
        f[t] = fastrl::credit::gae_turn_step(r[t], v[t], nv, done[t] || pending, k);
        nv = v[t];
        pending = false;
      } else {
        f[t] = fastrl::credit::gae_gap_step<double>(mode);
        if (reset) nv = 0.0;
        pending = pending || done[t];
      }
      carry = fastrl::credit::apply(f[t], carry);
      CHECK_NEAR(carry, expect[t], 1e-12);
    }
    check_two_chunks(f, expect, 4);
  }
  CHECK(fastrl::credit::implicit_reward(-1.0f, -1.5f, 0.1f) == 0.1f * 0.5f);
}

// Discounted returns with turn ends, by the header's steps, in each mode: (a) sequentially equal
// the recurrence written out, and (b) composing the row's maps in two chunks (the CUDA tile scan)
// gives the same returns up to rounding.
void test_returns_turn_steps() {
  using fastrl::credit::ReturnsMode;
  const std::vector<double> r = {0.1, -0.2, 0.7, 0.3, 1.0, 0.4, 0.5};
  const std::vector<bool> valid = {true, true, false, true, true, false, true};
  const std::vector<bool> done = {false, false, true, true, false, false, false};  // t=2 masked
  const double gamma = 0.9, tg = 0.5;
  const int T = static_cast<int>(r.size());
  for (auto mode : {ReturnsMode::kSkip, ReturnsMode::kReset, ReturnsMode::kCumsum}) {
    std::vector<double> expect(T);
    double g = 0.0;
    bool pending = false;
    for (int t = T - 1; t >= 0; --t) {  // written out
      const bool step = valid[t] || mode == ReturnsMode::kCumsum;
      if (step) {
        g = (valid[t] ? r[t] : 0.0) + ((done[t] || pending) ? tg : gamma) * g;
        pending = false;
      } else {
        if (mode == ReturnsMode::kReset) g = 0.0;
        pending = pending || done[t];
      }
      expect[t] = g;
    }
    std::vector<fastrl::credit::Affine<double>> f(T);
    double carry = 0.0;
    pending = false;
    for (int t = T - 1; t >= 0; --t) {  // the header's steps
      f[t] = fastrl::credit::returns_turn_step(r[t], static_cast<bool>(valid[t]),
                                               done[t] || pending, gamma, tg, mode);
      carry = fastrl::credit::apply(f[t], carry);
      CHECK_NEAR(carry, expect[t], 1e-12);
      pending = !fastrl::credit::returns_is_step(valid[t], mode) && (pending || done[t]);
    }
    check_two_chunks(f, expect, 3);
  }
  // the pending flag of t=2 reached t=1 in skip mode: G_1 = -0.2 + tg * G_3
  const double g3 = 0.3 + tg * (1.0 + gamma * 0.5);
  const double g1 = -0.2 + tg * g3;
  double carry = 0.0;
  bool pending = false;
  for (int t = T - 1; t >= 1; --t) {
    carry = fastrl::credit::apply(
        fastrl::credit::returns_turn_step(r[t], static_cast<bool>(valid[t]), done[t] || pending,
                                          gamma, tg, ReturnsMode::kSkip),
        carry);
    pending = !fastrl::credit::returns_is_step(valid[t], ReturnsMode::kSkip) && (pending || done[t]);
  }
  CHECK_NEAR(carry, g1, 1e-12);
}

fastrl::logprobs::SoftmaxState single(float z) {
  fastrl::logprobs::SoftmaxState st;
  st.m = z;
  st.s = 1.0f;
  st.t = 0.0f;
  return st;
}

// Merging the row in pieces (any split) gives the row's logsumexp and entropy.
void test_online_softmax_merge() {
  std::mt19937 rng(2);
  std::normal_distribution<double> n(0.0, 3.0);
  for (int trial = 0; trial < 50; ++trial) {
    const int V = 1 + trial * 7;
    std::vector<float> z(V);
    for (auto& x : z) x = static_cast<float>(n(rng));
    double mx = -INFINITY;
    for (float x : z) mx = std::fmax(mx, x);
    double s = 0.0, t = 0.0;
    for (float x : z) {
      s += std::exp(x - mx);
      t += std::exp(x - mx) * (x - mx);
    }
    const double lse = mx + std::log(s), entropy = std::log(s) - t / s;
    auto whole = fastrl::logprobs::state_empty();
    for (float x : z) whole = fastrl::logprobs::merge(whole, single(x));
    auto left = fastrl::logprobs::state_empty(), right = fastrl::logprobs::state_empty();
    for (int j = 0; j < V; ++j) {
      auto& part = j < V / 3 ? left : right;
      part = fastrl::logprobs::merge(part, single(z[j]));
    }
    const auto split = fastrl::logprobs::merge(left, right);
    for (const auto& st : {whole, split}) {
      CHECK_NEAR(fastrl::logprobs::state_lse(st), lse, 1e-5);
      CHECK_NEAR(fastrl::logprobs::state_entropy(st), entropy, 1e-4);
    }
  }
  // -inf logits have probability 0 and do not turn the entropy into NaN.
  auto st = fastrl::logprobs::merge(single(0.0f), single(-INFINITY));
  CHECK_NEAR(fastrl::logprobs::state_lse(st), 0.0, 1e-7);
  CHECK_NEAR(fastrl::logprobs::state_entropy(st), 0.0, 1e-7);
}

// grad_z against central finite differences of g_lp * log p(y) + g_ent * H + g_lse * lse (fp64).
void test_grad_z_matches_finite_differences() {
  const std::vector<double> z0 = {0.3, -1.2, 2.0, 0.0, -0.5};
  const int y = 2;
  const double g_lp = 0.7, g_ent = -0.4, g_lse = 0.25;
  auto objective = [&](const std::vector<double>& z) {
    double mx = -INFINITY, s = 0.0, t = 0.0;
    for (double x : z) mx = std::fmax(mx, x);
    for (double x : z) {
      s += std::exp(x - mx);
      t += std::exp(x - mx) * (x - mx);
    }
    const double lse = mx + std::log(s);
    return g_lp * (z[y] - lse) + g_ent * (std::log(s) - t / s) + g_lse * lse;
  };
  double mx = -INFINITY, s = 0.0, t = 0.0;
  for (double x : z0) mx = std::fmax(mx, x);
  for (double x : z0) {
    s += std::exp(x - mx);
    t += std::exp(x - mx) * (x - mx);
  }
  const float lse = static_cast<float>(mx + std::log(s));
  const float entropy = static_cast<float>(std::log(s) - t / s);
  for (int j = 0; j < static_cast<int>(z0.size()); ++j) {
    std::vector<double> up = z0, down = z0;
    up[j] += 1e-6;
    down[j] -= 1e-6;
    const double fd = (objective(up) - objective(down)) / 2e-6;
    const float p = std::exp(static_cast<float>(z0[j]) - lse);
    const float g = fastrl::logprobs::grad_z(static_cast<float>(z0[j]), p, lse, entropy,
                                             static_cast<float>(g_lp), static_cast<float>(g_ent),
                                             static_cast<float>(g_lse), j == y);
    CHECK_NEAR(g, fd, 1e-4);
  }
}

// k3 in the three KL conventions against its closed form in double, and each gradient against a
// central difference: verl clamps ref - logp to [-20, 20] and the value to [-10, 10], OpenRLHF
// clamps the value to [-10, 10], the unclamped OpenRLHF convention clamps nothing.
void test_k3_conventions() {
  using fastrl::credit::KlConvention;
  using fastrl::credit::KlKind;
  const double refs[] = {-1.0, -2.5, 0.0};
  const double ds[] = {-3.0, -0.5, 0.25, 2.0, 12.0, -25.0};  // d = logp - ref
  for (double r : refs) {
    for (double d : ds) {
      const double lp = r + d, x = -d;
      const double raw = std::exp(x) - 1.0 - x;  // all three before their clamps (verl's kl = x here)
      const double verl = std::fmin(std::fmax(std::exp(std::fmin(std::fmax(x, -20.0), 20.0)) -
                                                  std::fmin(std::fmax(x, -20.0), 20.0) - 1.0,
                                              -10.0),
                                    10.0);
      CHECK_NEAR((fastrl::credit::kl_value<KlKind::kK3, KlConvention::kVerl>(lp, r)), verl, 1e-9);
      CHECK_NEAR((fastrl::credit::kl_value<KlKind::kK3, KlConvention::kOpenRLHF>(lp, r)),
                 std::fmin(std::fmax(raw, -10.0), 10.0), 1e-9);
      CHECK_NEAR((fastrl::credit::kl_value<KlKind::kK3, KlConvention::kOpenRLHFUnclamped>(lp, r)), raw,
                 1e-9 * std::fmax(1.0, std::fabs(raw)));
      const double h = 1e-6;
      const double fd = (std::exp(-(d + h)) + (d + h) - std::exp(-(d - h)) - (d - h)) / (2 * h);
      CHECK_NEAR((fastrl::credit::kl_grad<KlKind::kK3, KlConvention::kOpenRLHFUnclamped>(lp, r)), fd,
                 1e-5 * std::fmax(1.0, std::fabs(fd)));
      const bool clamped = std::fabs(raw) > 10.0;  // OpenRLHF's clamp active: no gradient
      CHECK_NEAR((fastrl::credit::kl_grad<KlKind::kK3, KlConvention::kOpenRLHF>(lp, r)),
                 clamped ? 0.0 : fd, 1e-5 * std::fmax(1.0, std::fabs(fd)));
    }
  }
  CHECK((fastrl::credit::kl_grad<KlKind::kK1, KlConvention::kOpenRLHFUnclamped>(50.0, 0.0)) == 1.0);
  CHECK((fastrl::credit::kl_grad<KlKind::kK2, KlConvention::kOpenRLHFUnclamped>(50.0, 0.0)) == 50.0);
  CHECK((fastrl::credit::kl_value<KlKind::kK2, KlConvention::kOpenRLHFUnclamped>(50.0, 0.0)) == 1250.0);
}

}  // namespace

int main() {
  test_affine_composition_is_associative();
  test_gae_row_matches_recurrence();
  test_gae_turn_steps();
  test_returns_turn_steps();
  test_online_softmax_merge();
  test_grad_z_matches_finite_differences();
  test_k3_conventions();
  return check_summary("test_token_math");
}
