#include "cpu_copy.h"

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace zerocomm {
namespace {

// [Note: CPU copy threading] The comm worker copies on its own thread only
// (every task the scheduler enqueues holds a SerialCopies). It runs beside
// the training step's compute and its intra-op pool: an OpenMP team started
// from the worker takes cores the forward is using, and its threads then spin
// at the team barrier while the thread they wait for is descheduled. With a
// busy thread on the other core, benchmarks/flatten.py measured the old
// two-thread loop at 0.51 GB/s for 1000 x 4 KB (20 GB/s quiet) and 1.3 GB/s
// for 10 x 1 MB, below torch.cat's serial kernel in the same run (4 and
// 21-23 GB/s).
// Elsewhere (flatten()/unflatten() called by users; the gradient hand-over
// on the compute thread, between two of its ops) a copy whose pieces average
// kParallelPieceBytes or more is one at::parallel_for over the whole byte
// range: one team for all pieces. torch's copy_ per tensor, which is what
// split_with_sizes_copy does, starts and joins a team per tensor. Unflatten
// against split_with_sizes_copy, beside a busy process (3 runs): 1 x 1 MB
// 1.08-1.20x, 10 x 1 MB 1.26-1.83x, 100 x 1 MB 1.45-2.23x. Pieces smaller
// on average stay on the calling thread, one memcpy each: for them a team
// costs more than it gives, and beside a busy process it collapses as above
// (100 x 64 KB in one team: 2.2-4.2 ms, on the calling thread 0.9-1.0 ms).
// Figures: benchmarks/results/cpu/flatten_cpu*.json.
constexpr int64_t kParallelPieceBytes = 256 << 10;
constexpr int64_t kParallelGrainBytes = 256 << 10;

// [Note: streaming stores] A copy of kStreamingBytes or more writes with
// non-temporal stores (SSE2 movntdq; a plain memcpy elsewhere): its
// destination would not stay in cache anyway, and ordinary stores first read
// every destination line in (three memory transfers per line instead of
// two). On this project's 2-core CPU VM (32 MiB L3; both store kinds side
// by side in one prototype, 2026-11-26), in a loop that rewrites the same
// destination, streaming lost up to 4 MiB (the destination was
// still cached from the last call: 1 x 1 MB 57 against 44 us) and won from
// 8 MiB on (16 x 1 MB 1.2 against 1.8 ms; 1 x 64 MB 5.6 against 8.5 ms).
// Unflatten of 1 x 64 MB against split_with_sizes_copy: 1.69x quiet,
// 1.57-1.80x beside a busy process. The stores are fenced per thread before
// the copy returns.
constexpr int64_t kStreamingBytes = 8 << 20;

thread_local bool serial_copies = false;

void copy_bytes(char* dst, const char* src, int64_t n, bool streaming) {
#if defined(__SSE2__)
  if (streaming) {
    const int64_t head = std::min<int64_t>(
        n, (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15);
    std::memcpy(dst, src, head);
    int64_t i = head;
    for (; i + 64 <= n; i += 64) {
      const auto* s = reinterpret_cast<const __m128i*>(src + i);
      auto* d = reinterpret_cast<__m128i*>(dst + i);
      const __m128i a = _mm_loadu_si128(s);
      const __m128i b = _mm_loadu_si128(s + 1);
      const __m128i c = _mm_loadu_si128(s + 2);
      const __m128i e = _mm_loadu_si128(s + 3);
      _mm_stream_si128(d, a);
      _mm_stream_si128(d + 1, b);
      _mm_stream_si128(d + 2, c);
      _mm_stream_si128(d + 3, e);
    }
    std::memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  (void)streaming;
  std::memcpy(dst, src, n);
}

}  // namespace

void CopyPieces::add(void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return;
  dst_.push_back(static_cast<char*>(dst));
  src_.push_back(static_cast<const char*>(src));
  start_.push_back(total_);
  total_ += bytes;
}

void CopyPieces::copy_range(int64_t begin, int64_t end, bool streaming) const {
  size_t i = std::upper_bound(start_.begin(), start_.end(), begin) -
             start_.begin() - 1;
  for (; i < dst_.size() && start_[i] < end; ++i) {
    const int64_t piece_end = i + 1 < start_.size() ? start_[i + 1] : total_;
    const int64_t from = std::max(begin, start_[i]);
    const int64_t to = std::min(end, piece_end);
    if (to > from)
      copy_bytes(dst_[i] + (from - start_[i]), src_[i] + (from - start_[i]),
                 to - from, streaming);
  }
#if defined(__SSE2__)
  // Streaming stores are weakly ordered: visible to other threads (the
  // caller after the team's barrier, a collective) only after a fence.
  if (streaming) _mm_sfence();
#endif
}

void CopyPieces::run() const {
  if (total_ == 0) return;
  const bool streaming = total_ >= kStreamingBytes;
  const bool parallel =
      !serial_copies &&
      total_ >= kParallelPieceBytes * static_cast<int64_t>(dst_.size());
  if (parallel) {
    at::parallel_for(
        0, total_, kParallelGrainBytes,
        [&](int64_t begin, int64_t end) { copy_range(begin, end, streaming); });
  } else {
    copy_range(0, total_, streaming);
  }
}

SerialCopies::SerialCopies() : previous_(serial_copies) {
  serial_copies = true;
#ifdef _OPENMP
  // ATen ops the task runs besides the copies (a mean, a slice copy_) stay on
  // this thread too: this thread's OpenMP setting only (at::set_num_threads
  // would change every thread's), read after ATen's per-thread lazy init.
  threads_ = at::get_num_threads();
  omp_set_num_threads(1);
#endif
}

SerialCopies::~SerialCopies() {
#ifdef _OPENMP
  omp_set_num_threads(threads_);
#endif
  serial_copies = previous_;
}

}  // namespace zerocomm
