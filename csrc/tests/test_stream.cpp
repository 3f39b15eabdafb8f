// Unit tests for the CPU stream/event implementation (csrc/cpu_stream.cpp).
// A plain program run by ctest: each test is a function, CHECK records a
// failure and carries on, the last line is "N passed, N failed" and the exit
// status is non-zero when anything failed.
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "stream.h"

namespace {

using zerocomm::CpuEvent;
using zerocomm::CpuStream;
using zerocomm::Event;
using zerocomm::Millis;
using zerocomm::Stream;
using Clock = std::chrono::steady_clock;

// Generous: only reached when something is broken, never on a healthy run.
constexpr Millis kLong{10000};

int g_check_failures = 0;

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++g_check_failures;                                             \
      std::fprintf(stderr, "  CHECK failed at %s:%d: %s\n", __FILE__, \
                   __LINE__, #cond);                                  \
    }                                                                 \
  } while (0)

#define CHECK_MSG(cond, msg)                                               \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++g_check_failures;                                                  \
      std::fprintf(stderr, "  CHECK failed at %s:%d: %s (%s)\n", __FILE__, \
                   __LINE__, #cond, std::string(msg).c_str());             \
    }                                                                      \
  } while (0)

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

void sleep_ms(int ms) { std::this_thread::sleep_for(Millis(ms)); }

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// ---------------------------------------------------------------------------

void test_fifo_order() {
  CpuStream s;
  std::vector<int> seen;  // touched only by the worker until the event fires
  for (int i = 0; i < 1000; ++i) s.enqueue([&seen, i] { seen.push_back(i); });
  s.record()->synchronize(kLong, "fifo");
  CHECK(seen.size() == 1000);
  bool in_order = seen.size() == 1000;
  for (int i = 0; in_order && i < 1000; ++i) in_order = seen[i] == i;
  CHECK(in_order);
}

void test_record_waits_for_preceding_tasks() {
  CpuStream s;
  std::atomic<bool> ran{false};
  s.enqueue([&ran] {
    sleep_ms(50);
    ran = true;
  });
  auto ev = s.record();
  CHECK(!ev->query());  // the 50 ms task is still running
  CHECK(!ran);
  ev->synchronize(kLong, "slow task");
  CHECK(ran);
  CHECK(ev->query());
  // An event recorded on an idle stream completes promptly too.
  auto idle = s.record();
  idle->synchronize(kLong, "idle");
  CHECK(idle->query());
}

void test_many_events_complete_in_order() {
  CpuStream s;
  constexpr int kN = 10000;
  std::vector<std::shared_ptr<Event>> events;
  events.reserve(kN);
  std::atomic<int> counter{0};
  for (int i = 0; i < kN; ++i) {
    s.enqueue([&counter] { ++counter; });
    events.push_back(s.record());
  }
  events.back()->synchronize(kLong, "last of many");
  CHECK(counter == kN);
  int incomplete = 0, out_of_order = 0;
  for (int i = 0; i < kN; ++i) {
    if (!events[i]->query()) ++incomplete;
    if (i > 0) {
      auto* prev = dynamic_cast<CpuEvent*>(events[i - 1].get());
      auto* cur = dynamic_cast<CpuEvent*>(events[i].get());
      if (prev == nullptr || cur == nullptr ||
          cur->completed_at() < prev->completed_at())
        ++out_of_order;
    }
  }
  CHECK_MSG(incomplete == 0, std::to_string(incomplete) + " incomplete");
  CHECK_MSG(out_of_order == 0, std::to_string(out_of_order) + " out of order");
}

void test_exception_propagates_and_poisons() {
  CpuStream s;
  std::atomic<int> before{0}, after{0};
  s.enqueue([&before] { ++before; });
  auto ok = s.record();
  s.enqueue([] { throw std::runtime_error("boom: bucket 7 failed"); });
  s.enqueue([&after] { ++after; });  // must be skipped
  auto bad = s.record();
  s.enqueue([&after] { ++after; });  // skipped as well
  auto later = s.record();

  // Events recorded before the failure are clean.
  ok->synchronize(kLong, "before failure");
  CHECK(ok->query());

  bool threw = false;
  try {
    bad->synchronize(kLong, "after failure");
  } catch (const std::runtime_error& e) {
    threw = true;
    CHECK_MSG(std::string(e.what()) == "boom: bucket 7 failed", e.what());
  } catch (...) {
    CHECK_MSG(false, "synchronize threw something other than runtime_error");
  }
  CHECK(threw);

  // query() rethrows the same error instead of returning true.
  threw = false;
  try {
    (void)bad->query();
  } catch (const std::runtime_error& e) {
    threw = true;
    CHECK(std::string(e.what()) == "boom: bucket 7 failed");
  }
  CHECK(threw);

  // Every later event carries the error (the stream stays poisoned).
  threw = false;
  try {
    later->synchronize(kLong, "later");
  } catch (const std::runtime_error& e) {
    threw = true;
    CHECK(std::string(e.what()) == "boom: bucket 7 failed");
  }
  CHECK(threw);
  CHECK(before == 1);
  CHECK(after == 0);

  // block_current on a CPU event is synchronize: it rethrows as well.
  threw = false;
  try {
    bad->block_current(kLong, "block_current");
  } catch (const std::runtime_error&) {
    threw = true;
  }
  CHECK(threw);
}

void test_synchronize_timeout() {
  CpuStream s;
  const auto t0 = Clock::now();
  s.enqueue([] { sleep_ms(500); });
  auto ev = s.record();
  bool threw = false;
  try {
    ev->synchronize(Millis(50), "the gradient reduce-scatter");
  } catch (const c10::Error& e) {
    threw = true;
    const std::string msg = e.what();
    CHECK_MSG(contains(msg, "timed out"), msg);
    CHECK_MSG(contains(msg, "the gradient reduce-scatter"), msg);
    CHECK_MSG(contains(msg, "50 ms"), msg);
  } catch (...) {
    CHECK_MSG(false, "timeout threw something other than c10::Error");
  }
  const double waited = seconds_since(t0);
  CHECK(threw);
  // Returned on the timeout, well before the 500 ms task finished.
  CHECK_MSG(waited >= 0.045 && waited < 0.45, std::to_string(waited) + " s");
  // The event is still pending (unless this process was starved for ~0.5 s)
  // and completes once the task is done.
  const bool pending = !ev->query();
  CHECK(pending || seconds_since(t0) >= 0.45);
  ev->synchronize(kLong, "after timeout");
  CHECK(ev->query());
}

void test_cross_stream_wait() {
  CpuStream a, b;
  std::atomic<int> side_effect{0};
  std::atomic<int> observed{-1};
  a.enqueue([&side_effect] {
    sleep_ms(100);
    side_effect = 42;
  });
  auto a_done = a.record();
  b.wait(a_done, kLong, "stream A");
  b.enqueue([&side_effect, &observed] { observed = side_effect.load(); });
  auto b_done = b.record();
  b_done->synchronize(kLong, "stream B");
  CHECK(observed == 42);
  CHECK(a_done->query());
}

void test_cross_stream_wait_propagates_error_and_timeout() {
  // B waits a failed event of A: B is poisoned with A's error.
  {
    CpuStream a, b;
    a.enqueue([] { throw std::runtime_error("peer A died"); });
    b.wait(a.record(), kLong, "stream A");
    std::atomic<bool> ran{false};
    b.enqueue([&ran] { ran = true; });
    bool threw = false;
    try {
      b.record()->synchronize(kLong, "stream B");
    } catch (const std::runtime_error& e) {
      threw = true;
      CHECK(std::string(e.what()) == "peer A died");
    }
    CHECK(threw);
    CHECK(!ran);
  }
  // B's wait times out: B's later events fail with the timeout, naming it.
  {
    CpuStream a, b;
    a.enqueue([] { sleep_ms(500); });
    b.wait(a.record(), Millis(20), "stalled peer");
    bool threw = false;
    try {
      b.record()->synchronize(kLong, "stream B");
    } catch (const c10::Error& e) {
      threw = true;
      const std::string msg = e.what();
      CHECK_MSG(contains(msg, "timed out") && contains(msg, "stalled peer"),
                msg);
    }
    CHECK(threw);
  }
}

void test_elapsed_since() {
  CpuStream s;
  auto start = s.record();
  s.enqueue([] { sleep_ms(50); });
  auto end = s.record();
  end->synchronize(kLong, "elapsed");
  const double dt = end->elapsed_since(*start);
  CHECK_MSG(dt >= 0.049 && dt < 5.0, std::to_string(dt) + " s");
  CHECK(start->elapsed_since(*start) == 0.0);
  // Two back-to-back events: non-negative, small.
  auto e1 = s.record();
  auto e2 = s.record();
  e2->synchronize(kLong, "back to back");
  const double small = e2->elapsed_since(*e1);
  CHECK_MSG(small >= 0.0 && small < 1.0, std::to_string(small) + " s");

  // Mixing event kinds is refused.
  struct OtherEvent final : Event {
    bool query() override { return true; }
    void synchronize(Millis, const std::string&) override {}
    void block_current(Millis, const std::string&) override {}
    double elapsed_since(Event&) override { return 0; }
  } other;
  bool threw = false;
  try {
    (void)end->elapsed_since(other);
  } catch (const c10::Error&) {
    threw = true;
  }
  CHECK(threw);
}

void test_destructor_drains_queue() {
  std::atomic<int> ran{0};
  {
    CpuStream s;
    s.enqueue([] { sleep_ms(30); });  // keeps the rest queued at destruction
    for (int i = 0; i < 200; ++i) s.enqueue([&ran] { ++ran; });
  }
  CHECK_MSG(ran == 200, std::to_string(ran.load()) + " of 200 ran");

  // Through the abstract interface (shared_ptr<Stream>) as the scheduler
  // holds it.
  std::atomic<int> ran2{0};
  {
    std::shared_ptr<Stream> s = zerocomm::make_stream(-1, false);
    s->enqueue([] { sleep_ms(30); });
    for (int i = 0; i < 50; ++i) s->enqueue([&ran2] { ++ran2; });
  }
  CHECK(ran2 == 50);
}

void test_record_current_is_complete() {
  CpuStream s;
  s.enqueue([] { sleep_ms(100); });  // the stream itself is busy
  auto now = s.record_current();
  CHECK(now->query());
  bool threw = false;
  try {
    now->synchronize(Millis(0), "record_current");
  } catch (...) {
    threw = true;
  }
  CHECK(!threw);
  auto busy = s.record();
  CHECK(!busy->query());
}

void test_make_stream_cpu() {
  std::shared_ptr<Stream> s = zerocomm::make_stream(-1, false);
  CHECK(s != nullptr);
  if (!s) return;
  CHECK(!s->is_cuda());
  CHECK(dynamic_cast<CpuStream*>(s.get()) != nullptr);
  std::vector<int> seen;
  for (int i = 0; i < 100; ++i) s->enqueue([&seen, i] { seen.push_back(i); });
  auto ev = s->record();
  ev->synchronize(kLong, "make_stream");
  CHECK(seen.size() == 100 && seen.front() == 0 && seen.back() == 99);
  // wait() on an event of another stream via the interface.
  std::shared_ptr<Stream> t = zerocomm::make_stream(-1, true);
  std::atomic<int> x{0}, y{0};
  s->enqueue([&x] {
    sleep_ms(20);
    x = 1;
  });
  t->wait(s->record(), kLong, "s");
  t->enqueue([&x, &y] { y = x.load() + 1; });
  t->record()->synchronize(kLong, "t");
  CHECK(y == 2);
#ifndef ZEROCOMM_WITH_CUDA
  // A CPU-only build refuses a CUDA stream with a ValueError.
  bool threw = false;
  try {
    (void)zerocomm::make_stream(0, false);
  } catch (const c10::ValueError& e) {
    threw = true;
    CHECK_MSG(contains(e.what(), "without CUDA"), e.what());
  }
  CHECK(threw);
#endif
}

struct NamedTest {
  const char* name;
  void (*fn)();
};

const NamedTest kTests[] = {
    {"fifo_order", test_fifo_order},
    {"record_waits_for_preceding_tasks", test_record_waits_for_preceding_tasks},
    {"many_events_complete_in_order", test_many_events_complete_in_order},
    {"exception_propagates_and_poisons", test_exception_propagates_and_poisons},
    {"synchronize_timeout", test_synchronize_timeout},
    {"cross_stream_wait", test_cross_stream_wait},
    {"cross_stream_wait_propagates_error_and_timeout",
     test_cross_stream_wait_propagates_error_and_timeout},
    {"elapsed_since", test_elapsed_since},
    {"destructor_drains_queue", test_destructor_drains_queue},
    {"record_current_is_complete", test_record_current_is_complete},
    {"make_stream_cpu", test_make_stream_cpu},
};

}  // namespace

// Usage: test_stream [name-substring]  (runs the matching tests, else all)
int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int passed = 0, failed = 0;
  for (const auto& t : kTests) {
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
