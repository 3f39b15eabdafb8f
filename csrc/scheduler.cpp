#include "scheduler.h"

#include <c10/util/Exception.h>

#include "cpu_copy.h"

namespace zerocomm {

void Traffic::add(Tier tier, Collective op, const at::Tensor& t) {
  const int i = static_cast<int>(op);
  calls_[tier][i].fetch_add(1, std::memory_order_relaxed);
  bytes_[tier][i].fetch_add(static_cast<int64_t>(t.numel() * t.element_size()),
                            std::memory_order_relaxed);
}

std::vector<TrafficRow> Traffic::rows() const {
  static const char* tiers[] = {"shard", "replica"};
  static const char* ops[kOps] = {"broadcast", "all_gather", "reduce",
                                  "reduce_scatter", "all_reduce"};
  std::vector<TrafficRow> out;
  for (int t = 0; t < 2; ++t)
    for (int i = 0; i < kOps; ++i)
      if (calls_[t][i].load() > 0)
        out.emplace_back(tiers[t], ops[i], calls_[t][i].load(),
                         bytes_[t][i].load());
  return out;
}

SyncScheduler::SyncScheduler(std::shared_ptr<Stream> stream,
                             std::shared_ptr<Communicator> comm,
                             int64_t timeout_ms,
                             std::shared_ptr<Communicator> replica)
    : comm_(std::move(comm)),
      replica_(std::move(replica)),
      timeout_(timeout_ms),
      stream_(std::move(stream)) {
  TORCH_CHECK_VALUE(timeout_ms > 0, "timeout must be positive, got ",
                    timeout_ms, " ms");
  TORCH_CHECK_VALUE(stream_ && comm_,
                    "SyncScheduler needs a stream and a "
                    "communicator");
  std::vector<std::shared_ptr<Communicator>> comms{comm_};
  if (replica_) comms.push_back(replica_);
  watchdog_ = std::make_unique<Watchdog>(comms, timeout_);
  if (stream_->is_cuda()) {
    // Connect now, from this thread, bounded by the timeout (see warm_up).
    auto comm = comm_;
    auto rep = replica_;
    stream_->enqueue([comm, rep] {
      comm->warm_up();
      if (rep) rep->warm_up();
    });
    auto done = stream_->record();
    watchdog_->track(nullptr, done, "the communicator's warm-up");
    try {
      done->synchronize(timeout_, "the communicator's warm-up");
    } catch (...) {
      abort_comms();
      rethrow_cause();
    }
  }
}

SyncScheduler::~SyncScheduler() {
  try {
    close();
  } catch (...) {
    // Nothing to report to: the buffers stay with the stream (see close).
  }
}

void SyncScheduler::close() {
  std::lock_guard<std::mutex> closing(close_mu_);
  if (closed_) return;
  // The watchdog first: from here on only this thread touches the comm.
  watchdog_->stop();
  // Outstanding collectives finish (or time out) before buffers go away.
  std::shared_ptr<Event> last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = last_;
  }
  bool drained = !last;
  try {
    if (last && !aborted_ && !comm_->aborted()) {
      last->synchronize(timeout_, "close");
      drained = true;
    }
  } catch (...) {
  }
  if (!drained) {
    aborted_ = true;
    abort_comms();  // the worker's collective returns now
  }
  // Entry points refuse from here on (check_open).
  closed_ = true;
  // [Note: teardown after abort] Not drained (aborted, or the wait above
  // failed): the comm stream may still run queued work that touches the
  // buckets -- after an abort the collectives end at once, but the copy
  // kernels queued behind them still run. The buffers must outlive it, so
  // each is handed to the stream: CUDA: record_stream, the caching allocator
  // reuses the memory only after the comm stream has passed this point; CPU:
  // the queued tasks hold the buckets, and the stream drains (close) before
  // they are dropped.
  if (!drained) {
    auto keep = [this](const at::Tensor& t) {
      if (t.defined()) stream_->keep_alive(t);
    };
    for (const auto& b : params_) keep(b->flat);
    for (const auto& b : grads_) {
      keep(b->flat);
      keep(b->shard);
      keep(b->replica);
    }
  }
  stream_->close();  // CPU: runs (or skips, poisoned) the queue, joins
  comm_->close();    // gloo: the private backend's threads are joined here
  if (replica_) replica_->close();
  std::vector<std::shared_ptr<ParamBucket>> params;
  std::vector<std::shared_ptr<GradBucket>> grads;
  std::vector<Span> spans;
  {
    std::lock_guard<std::mutex> lock(mu_);
    params.swap(params_);
    grads.swap(grads_);
    spans.swap(spans_);
    last_.reset();
    origin_.reset();
  }
  // The buffers are dropped here, outside the lock: a tensor that still
  // has a Python object takes the GIL to release it.
}

void SyncScheduler::check_open() const {
  TORCH_CHECK(!closed_, "zerocomm: this zerocomm handle is closed");
}

void SyncScheduler::check_usable() {
  check_open();
  // [Note: no CUDA graph capture] The hooks' waits use events recorded
  // outside the capture, and the fused copy's device tables are host data of
  // the launch that made them: a replay would neither wait for the sync nor
  // copy the right tensors. Refused instead of quietly wrong.
  TORCH_CHECK(!stream_->capturing(),
              "zerocomm: its parameter sync and gradient reduction cannot be "
              "captured in a CUDA graph (the current stream is capturing). "
              "Capture only code without zerocomm's hooks, or run the step "
              "and the forward/backward it wraps eagerly");
  if (watchdog_->failed()) {
    aborted_ = true;
    watchdog_->rethrow_if_failed();
  }
  TORCH_CHECK(!aborted_,
              "zerocomm: the communicator was aborted after an "
              "error; close() this handle and attach again");
  try {
    comm_->check_error();
    if (replica_) replica_->check_error();
  } catch (...) {
    aborted_ = true;
    throw;
  }
}

void SyncScheduler::abort_comms() {
  comm_->abort();
  if (replica_) replica_->abort();
}

void SyncScheduler::rethrow_cause() {
  // Any failed wait ends this handle: the abort makes whatever the comm
  // stream still runs return now, so close() and exit do not wait for it.
  aborted_ = true;
  abort_comms();
  watchdog_->rethrow_if_failed();
  throw;
}

int64_t SyncScheduler::add_param_bucket(at::Tensor flat, int root,
                                        std::string label, Collective op) {
  TORCH_CHECK_VALUE(
      op == Collective::kBroadcast || op == Collective::kAllGather, "bucket ",
      label, ": a parameter bucket is broadcast or all-gathered");
  TORCH_CHECK_VALUE(
      op != Collective::kBroadcast || (root >= 0 && root < comm_->size()),
      "bucket ", label, ": root ", root, " is not a rank of a group of ",
      comm_->size());
  TORCH_CHECK_VALUE(
      op != Collective::kAllGather || flat.numel() % comm_->size() == 0,
      "bucket ", label, ": all-gather buffer of ", flat.numel(),
      " elements does not split over ", comm_->size(), " ranks");
  TORCH_CHECK_VALUE(flat.defined() && flat.dim() == 1 && flat.is_contiguous(),
                    "bucket ", label,
                    ": the parameter flat must be a contiguous 1-D tensor");
  auto b = std::make_shared<ParamBucket>();
  b->flat = std::move(flat);
  b->op = op;
  b->root = root;
  b->label = std::move(label);
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  params_.push_back(std::move(b));
  return static_cast<int64_t>(params_.size()) - 1;
}

int64_t SyncScheduler::add_grad_bucket(at::Tensor flat, at::Tensor shard,
                                       std::vector<int64_t> offsets,
                                       std::vector<int64_t> numels, int root,
                                       std::string label, Collective op,
                                       at::Tensor replica) {
  TORCH_CHECK_VALUE(op == Collective::kReduce ||
                        op == Collective::kReduceScatter ||
                        op == Collective::kAllReduce,
                    "bucket ", label,
                    ": a gradient bucket is reduced, reduce-scattered or "
                    "all-reduced");
  TORCH_CHECK_VALUE(
      op != Collective::kReduce || (root >= 0 && root < comm_->size()),
      "bucket ", label, ": bad reduction root ", root);
  TORCH_CHECK_VALUE(
      op != Collective::kReduceScatter ||
          (shard.defined() && shard.numel() * comm_->size() == flat.numel()),
      "bucket ", label, ": reduce-scatter needs a shard of ",
      flat.numel() / comm_->size(), " elements");
  TORCH_CHECK_VALUE(!replica.defined() || replica_, "bucket ", label,
                    ": a replica stage needs the scheduler's replica "
                    "communicator");
  TORCH_CHECK_VALUE(
      !replica.defined() || replica.scalar_type() == flat.scalar_type(),
      "bucket ", label, ": the replica tensor must have the bucket's dtype");
  auto b = std::make_shared<GradBucket>();
  b->in_layout = FlatLayout::explicit_offsets(
      std::move(offsets), std::move(numels), flat.numel(), flat.scalar_type());
  b->flat = std::move(flat);
  b->shard = std::move(shard);
  b->replica = std::move(replica);
  b->op = op;
  b->root = root;
  b->label = std::move(label);
  std::lock_guard<std::mutex> lock(mu_);
  check_open();
  grads_.push_back(std::move(b));
  return static_cast<int64_t>(grads_.size()) - 1;
}

std::shared_ptr<Event> SyncScheduler::enqueue_traced(const std::string& label,
                                                     std::function<void()> fn) {
  // Recorded always: the watchdog times the work from when `begin` completes
  // ([Note: watchdog timing]), not from now.
  auto begin = stream_->record();
  // Whoever waits later learns which sync failed, not just gloo's words.
  stream_->enqueue([label, fn = std::move(fn)] {
    // CPU: this runs on the comm worker, beside the compute's threads
    SerialCopies serial;  // [Note: CPU copy threading]
    try {
      fn();
    } catch (const c10::OutOfMemoryError& e) {
      // Stays a torch.OutOfMemoryError in Python (CUDA: the fused copy's
      // temporary tables come from the caching allocator).
      TORCH_CHECK_WITH(OutOfMemoryError, false, "zerocomm: sync of bucket ",
                       label,
                       " ran out of memory: ", e.what_without_backtrace());
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "zerocomm: sync of bucket ", label,
                  " failed: ", e.what_without_backtrace());
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "zerocomm: sync of bucket ", label,
                  " failed: ", e.what());
    }
  });
  auto end = stream_->record();
  watchdog_->track(begin, end, "sync of bucket " + label);
  if (tracing_) spans_.push_back({"comm", label, begin, end});
  last_ = end;
  return end;
}

void SyncScheduler::launch(const std::vector<int64_t>& order) {
  std::lock_guard<std::mutex> lock(mu_);
  check_usable();
  // Nothing below may touch parameters before the optimizer step that
  // produced them (and every forward/backward read before it) is done.
  stream_->wait(stream_->record_current(), timeout_, "the optimizer step");
  for (int64_t i : order) {
    TORCH_CHECK_INDEX(i >= 0 && i < static_cast<int64_t>(params_.size()),
                      "launch: no parameter bucket ", i);
    auto b = params_[i];
    auto comm = comm_;
    const double delay = debug_delay_s_;
    auto traffic = traffic_;
    b->done = enqueue_traced(b->label, [b, comm, delay, traffic] {
      if (delay > 0) comm->hold(delay, b->flat.is_cuda());
      traffic->add(Traffic::kShard, b->op, b->flat);
      if (b->op == Collective::kAllGather)
        comm->all_gather(b->flat);
      else
        comm->broadcast(b->flat, b->root);
    });
  }
}

void SyncScheduler::wait_event(std::shared_ptr<Event> ev,
                               const std::string& what,
                               const std::string& trace_label) {
  check_usable();
  if (!ev) return;
  std::shared_ptr<Event> begin;
  const bool tracing = tracing_;
  if (tracing) begin = stream_->record_current();
  try {
    // CUDA: a GPU-side wait; the watchdog bounds it. CPU: a host wait.
    ev->block_current(timeout_, what);
  } catch (...) {
    rethrow_cause();
  }
  if (tracing) {
    auto end = stream_->record_current();
    std::lock_guard<std::mutex> lock(mu_);
    spans_.push_back({"wait", trace_label, begin, end});
  }
}

void SyncScheduler::wait_param(int64_t i) {
  std::shared_ptr<ParamBucket> b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_open();
    TORCH_CHECK_INDEX(i >= 0 && i < static_cast<int64_t>(params_.size()),
                      "no parameter bucket ", i);
    b = params_[i];
  }
  wait_event(
      b->done,
      "parameter sync of bucket " + std::to_string(i) + " (" + b->label + ")",
      b->label);
}

void SyncScheduler::reduce_grads(int64_t i, std::vector<at::Tensor> grads,
                                 bool average) {
  std::lock_guard<std::mutex> lock(mu_);
  check_usable();
  TORCH_CHECK_INDEX(i >= 0 && i < static_cast<int64_t>(grads_.size()),
                    "no gradient bucket ", i);
  auto b = grads_[i];
  check_tensors(grads, b->in_layout, b->flat, b->label.c_str());
  // [Note: gradient ownership] The gradients are copied into the bucket now,
  // on the caller's compute stream (CPU: this thread), not later on the comm
  // stream: from here on the reduction reads only zerocomm's own buffer, so
  // whatever edits p.grad afterwards (clip_grad_norm_, GradScaler, another
  // all-reduce) cannot race with it. The previous reduction's use of `flat`
  // is ordered before the copy here: normally wait_grad did that already,
  // but after a backward whose step never came (refused, or an exception in
  // the loop) nobody waited, and the copy would overwrite a buffer the comm
  // stream is still reducing. CUDA: a GPU-side wait; CPU: usually done.
  if (b->done) {
    try {
      b->done->block_current(timeout_,
                             "the previous reduction of bucket " + b->label);
    } catch (...) {
      rethrow_cause();
    }
  }
  flatten(grads, b->in_layout, b->flat);
  stream_->wait(stream_->record_current(), timeout_, "backward");
  auto comm = comm_;
  auto rep = replica_;
  auto traffic = traffic_;
  b->done = enqueue_traced(b->label, [b, comm, rep, traffic, average] {
    // [Note: hierarchical layout] With a replica stage the shard group
    // sums, the replicas sum, and the mean is taken once, over L * M.
    const bool staged = b->replica.defined();
    const bool mean_here = average && !staged;
    traffic->add(Traffic::kShard, b->op, b->flat);
    if (b->op == Collective::kReduceScatter)
      comm->reduce_scatter(b->flat, b->shard, mean_here);
    else if (b->op == Collective::kAllReduce)
      comm->all_reduce(b->flat, mean_here);
    else
      comm->reduce(b->flat, b->root, mean_here);
    if (!staged) return;
    traffic->add(Traffic::kReplica, Collective::kAllReduce, b->replica);
    rep->all_reduce(b->replica, false);
    if (average) b->replica.div_(comm->size() * rep->size());
  });
}

void SyncScheduler::wait_grad(int64_t i) {
  std::shared_ptr<GradBucket> b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    check_open();
    TORCH_CHECK_INDEX(i >= 0 && i < static_cast<int64_t>(grads_.size()),
                      "no gradient bucket ", i);
    b = grads_[i];
  }
  wait_event(b->done,
             "gradient reduction of bucket " + std::to_string(i) + " (" +
                 b->label + ")",
             b->label);
}

void SyncScheduler::synchronize() {
  std::shared_ptr<Event> last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = last_;
  }
  wait_event(last, "all outstanding syncs", "synchronize");
}

void SyncScheduler::host_synchronize() {
  std::shared_ptr<Event> last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = last_;
  }
  check_usable();
  try {
    if (last) last->synchronize(timeout_, "all outstanding syncs");
  } catch (...) {
    rethrow_cause();
  }
  check_usable();
}

void SyncScheduler::check() {
  check_usable();
  std::lock_guard<std::mutex> lock(mu_);
  if (last_) last_->query();  // rethrows a failed task's error
}

void SyncScheduler::abort() {
  // No lock: abort() must get through while another thread holds mu_.
  aborted_ = true;
  abort_comms();
}

void SyncScheduler::set_tracing(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  tracing_ = on;
  stream_->set_timing(on);  // CUDA events time only while tracing
  if (on && !origin_) origin_ = stream_->record_current();
}

int64_t SyncScheduler::trace_begin(std::string lane, std::string label) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!tracing_) return -1;
  spans_.push_back(
      {std::move(lane), std::move(label), stream_->record_current(), nullptr});
  return static_cast<int64_t>(spans_.size()) - 1;
}

void SyncScheduler::trace_end(int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (id < 0 || id >= static_cast<int64_t>(spans_.size())) return;
  spans_[id].end = stream_->record_current();
}

std::vector<TraceRow> SyncScheduler::trace() {
  std::vector<Span> spans;
  std::shared_ptr<Event> origin;
  {
    std::lock_guard<std::mutex> lock(mu_);
    spans = spans_;
    origin = origin_;
  }
  std::vector<TraceRow> rows;
  if (!origin) return rows;
  for (auto& s : spans) {
    if (!s.begin || !s.end) continue;
    s.end->synchronize(timeout_, "trace span " + s.label);
    rows.emplace_back(s.lane, s.label, s.begin->elapsed_since(*origin),
                      s.end->elapsed_since(*origin));
  }
  return rows;
}

void SyncScheduler::clear_trace() {
  std::lock_guard<std::mutex> lock(mu_);
  spans_.clear();
  origin_ = tracing_ ? stream_->record_current() : nullptr;
}

}  // namespace zerocomm
