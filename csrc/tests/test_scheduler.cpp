// Unit tests for the watchdog and the sync scheduler on the CPU stream
// (csrc/watchdog.cpp, csrc/scheduler.cpp): the mechanisms issue 19 fixed
// that the CPU can run -- the watchdog times work from when it starts on the
// comm stream, teardown after an abort keeps the buckets alive for the work
// still queued, and a capturing stream is refused. Same harness as
// test_stream.cpp: EXPECT records a failure and carries on, the exit status is
// non-zero when anything failed.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "communicator.h"
#include "scheduler.h"
#include "stream.h"
#include "tests/check.h"
#include "watchdog.h"

namespace {

using zerocomm::Communicator;
using zerocomm::CpuStream;
using zerocomm::Event;
using zerocomm::Millis;
using zerocomm::Stream;
using zerocomm::SyncScheduler;
using zerocomm::Watchdog;
using zerocomm_test::Clock;

using zerocomm_test::contains;
using zerocomm_test::g_check_failures;
using zerocomm_test::kLong;
using zerocomm_test::seconds_since;
using zerocomm_test::sleep_ms;

// The message of what `fn` throws, or "" when it returns.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// A CPU stream that records what is handed to keep_alive and can claim to
// be capturing a CUDA graph.
class ProbeStream final : public Stream {
 public:
  explicit ProbeStream(bool capturing = false) : capturing_(capturing) {}
  void enqueue(std::function<void()> fn) override {
    inner_.enqueue(std::move(fn));
  }
  std::shared_ptr<Event> record() override { return inner_.record(); }
  void wait(std::shared_ptr<Event> event, Millis timeout,
            const std::string& what) override {
    inner_.wait(std::move(event), timeout, what);
  }
  std::shared_ptr<Event> record_current() override {
    return inner_.record_current();
  }
  void keep_alive(const at::Tensor& t) override {
    std::lock_guard<std::mutex> lock(mu_);
    kept_.insert(t.data_ptr());
  }
  bool is_cuda() const override { return false; }
  bool capturing() const override { return capturing_; }
  std::set<void*> kept() {
    std::lock_guard<std::mutex> lock(mu_);
    return kept_;
  }

 private:
  std::mutex mu_;
  std::set<void*> kept_;
  bool capturing_;
  CpuStream inner_;  // last: drained and joined first
};

std::shared_ptr<Communicator> wire(double seconds) {
  // One collective occupies the stream for `seconds`; abort ends it.
  return zerocomm::make_simulated_communicator(seconds * 1e6, 10.0, 8);
}

// ---------------------------------------------------------------------------
// [Note: watchdog timing]

void test_watchdog_ignores_time_before_the_work_starts() {
  // The comm stream first waits 600 ms (for the compute stream, in real
  // use), then runs a 10 ms collective. The timeout is 250 ms: timed from
  // the host's enqueue this would abort a healthy job; timed from `begin` it
  // must not.
  auto comm = wire(0.0);
  CpuStream s;
  Watchdog dog({comm}, Millis(250), Millis(20));
  s.enqueue([] { sleep_ms(600); });  // the wait on the compute stream
  auto begin = s.record();
  s.enqueue([] { sleep_ms(10); });  // the collective
  auto end = s.record();
  dog.track(begin, end, "a healthy collective behind a long wait");
  end->synchronize(kLong, "end");
  sleep_ms(100);  // a few more polls
  EXPECT(!dog.failed());
  EXPECT(!comm->aborted());
}

void test_watchdog_times_out_work_that_started() {
  // The same shape, but the collective itself stalls: aborted after about
  // the timeout, counted from when it started.
  auto comm = wire(0.0);
  auto s = std::make_shared<CpuStream>();
  Watchdog dog({comm}, Millis(250), Millis(20));
  s->enqueue([] { sleep_ms(300); });
  auto begin = s->record();
  s->enqueue([comm] { comm->hold(30.0, false); });  // ends on abort
  auto end = s->record();
  const auto t0 = Clock::now();
  dog.track(begin, end, "a stalled collective");
  while (!dog.failed() && seconds_since(t0) < 10) sleep_ms(10);
  const double fired = seconds_since(t0);
  EXPECT(dog.failed());
  EXPECT(comm->aborted());
  // not before the work started (300 ms) plus the timeout (250 ms)
  EXPECT_MSG(fired >= 0.5, std::to_string(fired) + " s");
  const std::string msg = error_of([&] { dog.rethrow_if_failed(); });
  EXPECT_MSG(
      contains(msg, "timed out") && contains(msg, "a stalled collective"), msg);
  // the aborted hold ended: the stream drains
  EXPECT(!error_of([&] { end->synchronize(kLong, "end"); }).empty());
}

void test_watchdog_without_begin_times_from_the_front() {
  // Entries without a begin event (the warm-up) keep the old rule.
  auto comm = wire(0.0);
  CpuStream s;
  Watchdog dog({comm}, Millis(150), Millis(20));
  s.enqueue([comm] { comm->hold(30.0, false); });
  auto end = s.record();
  dog.track(nullptr, end, "the warm-up");
  const auto t0 = Clock::now();
  while (!dog.failed() && seconds_since(t0) < 10) sleep_ms(10);
  EXPECT(dog.failed());
  EXPECT(comm->aborted());
}

// ---------------------------------------------------------------------------
// [Note: teardown after abort]

struct Tensors {
  at::Tensor flat = at::zeros({64});
  at::Tensor grad_flat = at::zeros({32});
  at::Tensor grad_shard = at::zeros({32});
};

std::unique_ptr<SyncScheduler> make_scheduler(
    const std::shared_ptr<ProbeStream>& stream,
    const std::shared_ptr<Communicator>& comm, Tensors& t) {
  auto sched = std::make_unique<SyncScheduler>(stream, comm, 10000);
  sched->add_param_bucket(t.flat, 0, "p0");
  sched->add_grad_bucket(t.grad_flat, t.grad_shard, {0}, {8}, /*root=*/-1, "g0",
                         zerocomm::Collective::kReduceScatter);
  return sched;
}

void test_teardown_after_abort_keeps_buckets_alive() {
  auto stream = std::make_shared<ProbeStream>();
  auto comm = wire(300.0);  // the sync never finishes by itself
  Tensors t;
  auto sched = make_scheduler(stream, comm, t);
  sched->launch({0});
  sched->abort();
  const auto t0 = Clock::now();
  sched.reset();  // no final sync after an abort: must not wait
  EXPECT(seconds_since(t0) < 5);
  const auto kept = stream->kept();
  for (const auto* p : {&t.flat, &t.grad_flat, &t.grad_shard})
    EXPECT(kept.count(p->data_ptr()) == 1);
}

void test_teardown_after_drain_needs_no_keep_alive() {
  // Negative control: a drained scheduler hands nothing to the stream.
  auto stream = std::make_shared<ProbeStream>();
  auto comm = wire(0.0);
  Tensors t;
  auto sched = make_scheduler(stream, comm, t);
  sched->launch({0});
  sched->host_synchronize();
  const auto rows =
      sched->traffic();  // the sync ran: one broadcast of the flat
  EXPECT(rows.size() == 1 && std::get<2>(rows[0]) == 1);
  sched.reset();
  EXPECT(stream->kept().empty());
}

// ---------------------------------------------------------------------------
// [Note: no CUDA graph capture]

void test_capture_is_refused_with_a_clear_error() {
  auto stream = std::make_shared<ProbeStream>(/*capturing=*/true);
  auto comm = wire(0.0);
  Tensors t;
  auto sched = make_scheduler(stream, comm, t);
  const std::vector<std::function<void()>> calls = {
      [&] { sched->launch({0}); },
      [&] { sched->wait_param(0); },
      [&] { sched->reduce_grads(0, {at::ones({8})}, false); },
      [&] { sched->wait_grad(0); },
      [&] { sched->synchronize(); },
  };
  for (const auto& call : calls) {
    const std::string msg = error_of(call);
    EXPECT_MSG(contains(msg, "CUDA graph"), msg);
  }
  EXPECT(!sched->aborted());  // refused, not broken
  EXPECT(!comm->aborted());
}

const zerocomm_test::NamedTest kTests[] = {
    {"watchdog_ignores_time_before_the_work_starts",
     test_watchdog_ignores_time_before_the_work_starts},
    {"watchdog_times_out_work_that_started",
     test_watchdog_times_out_work_that_started},
    {"watchdog_without_begin_times_from_the_front",
     test_watchdog_without_begin_times_from_the_front},
    {"teardown_after_abort_keeps_buckets_alive",
     test_teardown_after_abort_keeps_buckets_alive},
    {"teardown_after_drain_needs_no_keep_alive",
     test_teardown_after_drain_needs_no_keep_alive},
    {"capture_is_refused_with_a_clear_error",
     test_capture_is_refused_with_a_clear_error},
};

}  // namespace

// Usage: test_scheduler [name-substring]  (runs the matching tests, else all)
int main(int argc, char** argv) {
  return zerocomm_test::run_tests(kTests, argc > 1 ? argv[1] : "");
}
