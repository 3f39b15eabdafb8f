// What the ctest programs share: EXPECT records a failure and carries on
// (the program's last line is "N passed, N failed", its exit status non-zero
// when anything failed), plus small timing helpers.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>

#include "stream.h"

namespace zerocomm_test {

using Clock = std::chrono::steady_clock;

// Generous: only reached when something is broken, never on a healthy run.
constexpr zerocomm::Millis kLong{10000};

inline int g_check_failures = 0;

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

inline void sleep_ms(int ms) {
  std::this_thread::sleep_for(zerocomm::Millis(ms));
}

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct NamedTest {
  const char* name;
  void (*fn)();
};

// Runs the tests whose name contains `filter` (all when empty): one
// PASS/FAIL line each, then "N passed, N failed". The process exit status.
template <size_t N>
int run_tests(const NamedTest (&tests)[N], const std::string& filter) {
  int passed = 0, failed = 0;
  for (const auto& t : tests) {
    if (!filter.empty() && !contains(t.name, filter)) continue;
    const int before = g_check_failures;
    const auto t0 = Clock::now();
    bool escaped = false;
    try {
      t.fn();
    } catch (const std::exception& e) {
      escaped = true;
      std::fprintf(stderr, "  unexpected exception: %s\n", e.what());
    } catch (...) {
      escaped = true;
      std::fprintf(stderr, "  unexpected non-std exception\n");
    }
    const bool ok = !escaped && g_check_failures == before;
    (ok ? passed : failed)++;
    std::printf("[%s] %s (%.3f s)\n", ok ? "PASS" : "FAIL", t.name,
                seconds_since(t0));
    std::fflush(stdout);
  }
  if (passed + failed == 0) {
    std::printf("no test matches '%s'\n", filter.c_str());
    return 2;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace zerocomm_test

#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++zerocomm_test::g_check_failures;                              \
      std::fprintf(stderr, "  CHECK failed at %s:%d: %s\n", __FILE__, \
                   __LINE__, #cond);                                  \
    }                                                                 \
  } while (0)

#define EXPECT_MSG(cond, msg)                                              \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++zerocomm_test::g_check_failures;                                   \
      std::fprintf(stderr, "  CHECK failed at %s:%d: %s (%s)\n", __FILE__, \
                   __LINE__, #cond, std::string(msg).c_str());             \
    }                                                                      \
  } while (0)
