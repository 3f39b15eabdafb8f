// The sync scheduler: everything zerocomm puts on its comm stream, in order.
// Parameter sync: wait "step done" -> per bucket: broadcast or all-gather of
// the flat the parameters view -> record the bucket's event. Gradient
// reduction: per bucket: wait the compute stream -> copy-in (ZeRO-2's
// staging) -> reduce / reduce-scatter.
#pragma once

#include <atomic>
#include <mutex>
#include <tuple>

#include "communicator.h"
#include "flatten.h"
#include "stream.h"
#include "watchdog.h"

namespace zerocomm {

// What a bucket's collective is: parameter buckets broadcast from a root
// rank or all-gather in place (this rank's shard is flat.chunk(size)[rank]);
// gradient buckets reduce to a root rank, reduce-scatter into `shard` or
// all-reduce. Only kBroadcast and kReduce read the bucket's root.
enum class Collective {
  kBroadcast,
  kAllGather,
  kReduce,
  kReduceScatter,
  kAllReduce
};

// A parameter bucket: broadcast / all-gather of `flat` in place (the
// parameters are views of it: nothing is copied in or out).
struct ParamBucket {
  at::Tensor flat;  // persistent, owned: never recycled
  Collective op = Collective::kAllGather;
  int root = -1;  // kBroadcast: the rank it is broadcast from
  std::string label;
  std::shared_ptr<Event> done;  // null until first launched
};

// A gradient bucket: gradients copied in (in_layout) -> reduce /
// reduce-scatter / all-reduce over the shard group -> (hierarchical) the
// all-reduce of `replica` across the replicas ([Note: hierarchical layout]).
struct GradBucket {
  at::Tensor flat;   // persistent, owned: never recycled
  at::Tensor shard;  // kReduceScatter's output (may be flat's own slice)
  // What this rank all-reduces across its replicas after the shard group's
  // collective (its reduced shard, or the owned bucket); undefined: nothing
  at::Tensor replica;
  FlatLayout in_layout;
  Collective op = Collective::kReduceScatter;
  int root = -1;  // kReduce: the rank it is reduced to
  std::string label;
  std::shared_ptr<Event> done;  // null until first launched
};

using TraceRow = std::tuple<std::string, std::string, double, double>;
// (tier: "shard" or "replica", collective, calls, bytes): what this rank
// handed to each communicator since the scheduler was made.
using TrafficRow = std::tuple<std::string, std::string, int64_t, int64_t>;

// Bytes handed to each collective, per communicator tier: a measurement of
// what the scheduler sent, for tests and stats (one atomic add per call).
class Traffic {
 public:
  enum Tier { kShard = 0, kReplica = 1 };
  void add(Tier tier, Collective op, const at::Tensor& t);
  std::vector<TrafficRow> rows() const;

 private:
  static constexpr int kOps = 5;
  std::atomic<int64_t> calls_[2][kOps] = {};
  std::atomic<int64_t> bytes_[2][kOps] = {};
};

class SyncScheduler {
 public:
  // `replica` (may be null): the communicator across the replicas of this
  // rank's shard (hierarchical ZeRO); grad buckets with a `replica` tensor
  // all-reduce it there after the shard group's collective.
  SyncScheduler(std::shared_ptr<Stream> stream,
                std::shared_ptr<Communicator> comm, int64_t timeout_ms,
                std::shared_ptr<Communicator> replica = nullptr);
  ~SyncScheduler();
  SyncScheduler(const SyncScheduler&) = delete;
  SyncScheduler& operator=(const SyncScheduler&) = delete;

  int64_t add_param_bucket(at::Tensor flat, int root, std::string label,
                           Collective op = Collective::kBroadcast);
  int64_t add_grad_bucket(at::Tensor flat, at::Tensor shard,
                          std::vector<int64_t> offsets,
                          std::vector<int64_t> numels, int root,
                          std::string label,
                          Collective op = Collective::kReduce,
                          at::Tensor replica = {});

  // Enqueue the parameter sync of `order` (bucket ids, forward order).
  void launch(const std::vector<int64_t>& order);
  // The caller's compute stream waits for param bucket `i` (GPU-side on
  // CUDA). No-op before the bucket's first launch.
  void wait_param(int64_t i);
  // Copy `grads` (in the bucket's slot order) into the bucket on the caller's
  // stream now, then enqueue its reduction (see [Note: gradient ownership]).
  void reduce_grads(int64_t i, std::vector<at::Tensor> grads, bool average);
  void wait_grad(int64_t i);
  // Compute stream waits for everything enqueued so far.
  void synchronize();
  // Host waits for everything enqueued so far; raises errors and timeouts.
  void host_synchronize();
  // Raises a pending transport error, if any, without waiting.
  void check();
  // Abort the transport (after an error); later waits fail fast.
  void abort();
  // Tear down now, on the calling thread: stop the watchdog, wait for (or,
  // after an error, abort) the outstanding syncs, join the comm worker, free
  // the communicator's transport and drop the buffers. Every later call
  // raises "closed". Idempotent; the destructor calls it. The bindings run
  // it without the GIL ([Note: native teardown without the GIL]).
  void close();
  bool aborted() const { return aborted_.load(); }

  void set_tracing(bool on);
  int64_t trace_begin(std::string lane, std::string label);
  void trace_end(int64_t id);
  // (lane, label, start_s, end_s) relative to when tracing was turned on.
  std::vector<TraceRow> trace();
  void clear_trace();

  // Tests: every parameter-bucket task first holds the comm stream this long
  // (CPU: an abortable sleep on the worker; CUDA: the spin kernel on the
  // comm stream), to make overlap and ordering observable.
  void set_debug_delay(double seconds) { debug_delay_s_ = seconds; }
  int64_t timeout_ms() const { return timeout_.count(); }
  std::string transport() const { return comm_->name(); }
  std::vector<TrafficRow> traffic() const { return traffic_->rows(); }
  bool is_cuda() const { return stream_->is_cuda(); }

 private:
  struct Span {
    std::string lane, label;
    std::shared_ptr<Event> begin, end;
  };
  void wait_event(std::shared_ptr<Event> ev, const std::string& what,
                  const std::string& trace_label);
  // Raises "closed", the watchdog's error, "aborted", or the transport's
  // error (and then marks this scheduler aborted): every entry point calls
  // it first.
  void check_usable();
  void check_open() const;
  // Rethrows the watchdog's error if it has one (the cause of an abort),
  // else the exception being handled.
  [[noreturn]] void rethrow_cause();
  void abort_comms();  // the shard group's communicator and the replicas'
  std::shared_ptr<Event> enqueue_traced(const std::string& label,
                                        std::function<void()> fn);

  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<Communicator> replica_;  // null when flat
  // Shared with the queued tasks, which count on the comm worker.
  std::shared_ptr<Traffic> traffic_ = std::make_shared<Traffic>();
  std::vector<std::shared_ptr<ParamBucket>> params_;
  std::vector<std::shared_ptr<GradBucket>> grads_;
  std::shared_ptr<Event> last_;
  Millis timeout_;
  std::mutex mu_;
  bool tracing_ = false;
  std::atomic<bool> aborted_{false};
  std::atomic<bool> closed_{false};
  std::mutex close_mu_;  // close() runs once; a second caller waits for it
  double debug_delay_s_ = 0.0;
  std::shared_ptr<Event> origin_;
  std::vector<Span> spans_;
  // Closed before the buckets are dropped: the CPU worker drains its queue
  // while the buckets its tasks point to are still alive.
  std::shared_ptr<Stream> stream_;
  // Stopped first of all, in close().
  std::unique_ptr<Watchdog> watchdog_;
};

}  // namespace zerocomm
