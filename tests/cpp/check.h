// The few check macros of the host tests (no framework): every failed check is printed, and
// check_summary() gives the exit code. Independent of NDEBUG.
#pragma once

#include <cmath>
#include <cstdio>

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    ++g_checks;                                                                     \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

// |a - b| <= tol * max(1, |b|), NaN only equal to NaN.
#define CHECK_NEAR(a, b, tol)                                                                  \
  do {                                                                                         \
    ++g_checks;                                                                                \
    const double a_ = static_cast<double>(a), b_ = static_cast<double>(b);                     \
    const bool ok_ = (std::isnan(a_) && std::isnan(b_)) ||                                     \
                     (std::fabs(a_ - b_) <= (tol) * std::fmax(1.0, std::fabs(b_)));            \
    if (!ok_) {                                                                                \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %.17g vs %s = %.17g (tol %g)\n",   \
                   __FILE__, __LINE__, #a, a_, #b, b_, static_cast<double>(tol));              \
      ++g_failures;                                                                            \
    }                                                                                          \
  } while (0)

int check_summary(const char* name) {
  if (g_failures != 0) {
    std::fprintf(stderr, "%s: %d of %d checks failed\n", name, g_failures, g_checks);
    return 1;
  }
  std::printf("%s: all %d checks passed\n", name, g_checks);
  return 0;
}

}  // namespace
