// What the ctest programs share: EXPECT records a failure and carries on
// (the program's last line is "N passed, N failed", its exit status non-zero
// when anything failed), plus small timing helpers.
#pragma once

#include <chrono>
#include <cstdio>
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
