// Unit tests for the CPU stream/event implementation (csrc/cpu_stream.cpp).
// A plain program run by ctest: each test is a function, EXPECT (tests/check.h)
// records a failure and carries on, the last line is "N passed, N failed" and
// the exit status is non-zero when anything failed.
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
#include "tests/check.h"

namespace {

using zerocomm::CpuEvent;
using zerocomm::CpuStream;
using zerocomm::Event;
using zerocomm::Millis;
using zerocomm::Stream;
using zerocomm_test::Clock;

using zerocomm_test::contains;
using zerocomm_test::g_check_failures;
using zerocomm_test::kLong;
using zerocomm_test::seconds_since;
using zerocomm_test::sleep_ms;

// ---------------------------------------------------------------------------

void test_fifo_order() {
  CpuStream s;
  std::vector<int> seen;  // touched only by the worker until the event fires
  for (int i = 0; i < 1000; ++i) s.enqueue([&seen, i] { seen.push_back(i); });
  s.record()->synchronize(kLong, "fifo");
  EXPECT(seen.size() == 1000);
  bool in_order = seen.size() == 1000;
  for (int i = 0; in_order && i < 1000; ++i) in_order = seen[i] == i;
  EXPECT(in_order);
}

void test_record_waits_for_preceding_tasks() {
  CpuStream s;
  std::atomic<bool> ran{false};
  s.enqueue([&ran] {
    sleep_ms(50);
    ran = true;
  });
  auto ev = s.record();
  EXPECT(!ev->query());  // the 50 ms task is still running
  EXPECT(!ran);
  ev->synchronize(kLong, "slow task");
  EXPECT(ran);
  EXPECT(ev->query());
  // An event recorded on an idle stream completes promptly too.
  auto idle = s.record();
  idle->synchronize(kLong, "idle");
  EXPECT(idle->query());
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
  EXPECT(counter == kN);
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
  EXPECT_MSG(incomplete == 0, std::to_string(incomplete) + " incomplete");
  EXPECT_MSG(out_of_order == 0, std::to_string(out_of_order) + " out of order");
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
  EXPECT(ok->query());

  bool threw = false;
  try {
    bad->synchronize(kLong, "after failure");
  } catch (const std::runtime_error& e) {
    threw = true;
    EXPECT_MSG(std::string(e.what()) == "boom: bucket 7 failed", e.what());
  } catch (...) {
    EXPECT_MSG(false, "synchronize threw something other than runtime_error");
  }
  EXPECT(threw);

  // query() rethrows the same error instead of returning true.
  threw = false;
  try {
    (void)bad->query();
  } catch (const std::runtime_error& e) {
    threw = true;
    EXPECT(std::string(e.what()) == "boom: bucket 7 failed");
  }
  EXPECT(threw);

  // Every later event carries the error (the stream stays poisoned).
  threw = false;
  try {
    later->synchronize(kLong, "later");
  } catch (const std::runtime_error& e) {
    threw = true;
    EXPECT(std::string(e.what()) == "boom: bucket 7 failed");
  }
  EXPECT(threw);
  EXPECT(before == 1);
  EXPECT(after == 0);

  // block_current on a CPU event is synchronize: it rethrows as well.
  threw = false;
  try {
    bad->block_current(kLong, "block_current");
  } catch (const std::runtime_error&) {
    threw = true;
  }
  EXPECT(threw);
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
    EXPECT_MSG(contains(msg, "timed out"), msg);
    EXPECT_MSG(contains(msg, "the gradient reduce-scatter"), msg);
    EXPECT_MSG(contains(msg, "50 ms"), msg);
  } catch (...) {
    EXPECT_MSG(false, "timeout threw something other than c10::Error");
  }
  const double waited = seconds_since(t0);
  EXPECT(threw);
  // Returned on the timeout, well before the 500 ms task finished.
  EXPECT_MSG(waited >= 0.045 && waited < 0.45, std::to_string(waited) + " s");
  // The event is still pending (unless this process was starved for ~0.5 s)
  // and completes once the task is done.
  const bool pending = !ev->query();
  EXPECT(pending || seconds_since(t0) >= 0.45);
  ev->synchronize(kLong, "after timeout");
  EXPECT(ev->query());
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
  EXPECT(observed == 42);
  EXPECT(a_done->query());
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
      EXPECT(std::string(e.what()) == "peer A died");
    }
    EXPECT(threw);
    EXPECT(!ran);
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
      EXPECT_MSG(contains(msg, "timed out") && contains(msg, "stalled peer"),
                 msg);
    }
    EXPECT(threw);
  }
}

void test_elapsed_since() {
  CpuStream s;
  auto start = s.record();
  s.enqueue([] { sleep_ms(50); });
  auto end = s.record();
  end->synchronize(kLong, "elapsed");
  const double dt = end->elapsed_since(*start);
  EXPECT_MSG(dt >= 0.049 && dt < 5.0, std::to_string(dt) + " s");
  EXPECT(start->elapsed_since(*start) == 0.0);
  // Two back-to-back events: non-negative, small.
  auto e1 = s.record();
  auto e2 = s.record();
  e2->synchronize(kLong, "back to back");
  const double small = e2->elapsed_since(*e1);
  EXPECT_MSG(small >= 0.0 && small < 1.0, std::to_string(small) + " s");

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
  EXPECT(threw);
}

void test_destructor_drains_queue() {
  std::atomic<int> ran{0};
  {
    CpuStream s;
    s.enqueue([] { sleep_ms(30); });  // keeps the rest queued at destruction
    for (int i = 0; i < 200; ++i) s.enqueue([&ran] { ++ran; });
  }
  EXPECT_MSG(ran == 200, std::to_string(ran.load()) + " of 200 ran");

  // Through the abstract interface (shared_ptr<Stream>) as the scheduler
  // holds it.
  std::atomic<int> ran2{0};
  {
    std::shared_ptr<Stream> s = zerocomm::make_stream(-1, false);
    s->enqueue([] { sleep_ms(30); });
    for (int i = 0; i < 50; ++i) s->enqueue([&ran2] { ++ran2; });
  }
  EXPECT(ran2 == 50);
}

void test_record_current_is_complete() {
  CpuStream s;
  s.enqueue([] { sleep_ms(100); });  // the stream itself is busy
  auto now = s.record_current();
  EXPECT(now->query());
  bool threw = false;
  try {
    now->synchronize(Millis(0), "record_current");
  } catch (...) {
    threw = true;
  }
  EXPECT(!threw);
  auto busy = s.record();
  EXPECT(!busy->query());
}

void test_make_stream_cpu() {
  std::shared_ptr<Stream> s = zerocomm::make_stream(-1, false);
  EXPECT(s != nullptr);
  if (!s) return;
  EXPECT(!s->is_cuda());
  EXPECT(dynamic_cast<CpuStream*>(s.get()) != nullptr);
  std::vector<int> seen;
  for (int i = 0; i < 100; ++i) s->enqueue([&seen, i] { seen.push_back(i); });
  auto ev = s->record();
  ev->synchronize(kLong, "make_stream");
  EXPECT(seen.size() == 100 && seen.front() == 0 && seen.back() == 99);
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
  EXPECT(y == 2);
#ifndef ZEROCOMM_WITH_CUDA
  // A CPU-only build refuses a CUDA stream with a ValueError.
  bool threw = false;
  try {
    (void)zerocomm::make_stream(0, false);
  } catch (const c10::ValueError& e) {
    threw = true;
    EXPECT_MSG(contains(e.what(), "without CUDA"), e.what());
  }
  EXPECT(threw);
#endif
}

const zerocomm_test::NamedTest kTests[] = {
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
  return zerocomm_test::run_tests(kTests, argc > 1 ? argv[1] : "");
}
