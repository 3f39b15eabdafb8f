// CPU byte copies for flatten / unflatten: how many threads copy, and
// whether the stores bypass the cache ([Note: CPU copy threading] and
// [Note: streaming stores] in cpu_copy.cpp). One mechanism: a list of
// (destination, source, bytes) pieces copied as one byte range.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace zerocomm {

// The pieces of one fused copy, laid end to end: piece i covers bytes
// [start[i], start[i] + bytes[i]) of the range.
class CopyPieces {
 public:
  void add(void* dst, const void* src, int64_t bytes);
  int64_t total() const { return total_; }
  size_t size() const { return dst_.size(); }
  // Copies all pieces: threads and store kind as the notes say.
  void run() const;

 private:
  void copy_range(int64_t begin, int64_t end, bool streaming) const;

  std::vector<char*> dst_;
  std::vector<const char*> src_;
  std::vector<int64_t> start_;
  int64_t total_ = 0;
};

// While one exists on a thread, that thread's CPU copies, and the ATen ops
// it runs, stay on it (the scheduler's comm-stream tasks hold one: [Note:
// CPU copy threading]).
class SerialCopies {
 public:
  SerialCopies();
  ~SerialCopies();
  SerialCopies(const SerialCopies&) = delete;
  SerialCopies& operator=(const SerialCopies&) = delete;

 private:
  bool previous_;
  int threads_ = 1;  // this thread's OpenMP threads before
};

}  // namespace zerocomm
