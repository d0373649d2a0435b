// The streaming engine: executes a resolved surgery job (computed in Python) on a thread pool.
//
// A job is a list of source files and a list of output shards. Each output shard is a header
// (bytes) and tensors at fixed output offsets, each one op over source byte ranges. The engine
// knows nothing about models, plans or JSON: all of that is resolved in Python
// (tli_kernels/checkpoint/executor_native.py). Design notes: docs/engine.md.
//
// Life of a shard: NAME.partial is created at its full size (all holes), the header written,
// its tensors written chunk by chunk by any worker, checksummed (sampled ranges read back, or
// every piece hashed as it passes through), fsynced, its sidecar written, renamed to NAME and
// the folder fsynced.
// Memory: each worker owns one buffer of `buffer_bytes`; nothing else grows with the model.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checksum.h"
#include "numerics.h"

namespace tli {

enum class OpKind : uint8_t {
  ByteCopy = 0, Cast = 1, Scale = 2, Average = 3, Zeros = 4, Fill = 5, Uniform = 6,
  Dequant = 7  // sources: (FP8 weight, scale) pairs; see TensorTask::cols
};

struct SourceRef {
  uint32_t file;    // index into Job::files
  uint64_t offset;  // absolute byte offset of the tensor's first byte
  DType dtype;
};

struct TensorTask {
  std::string name;
  uint64_t out_offset;  // absolute byte offset in the output file
  uint64_t nbytes;      // output bytes
  DType dtype;          // output dtype (OTHER: only ByteCopy and Zeros)
  OpKind op;
  double factor = 1.0;  // scale / average
  double value = 0.0;   // fill; for scale / average: the offset o of (x + o) * factor - o
  uint64_t seed = 0;    // uniform
  double bound = 0.0;   // uniform
  bool has_pre_round = false;  // scale: round each source value to pre_round first
  DType pre_round = DType::BF16;
  std::vector<SourceRef> sources;
  // Dequant: the weight's columns and the block (rows x columns) each scale element covers; the scale
  // grid is ceil(rows / block_rows) x ceil(cols / block_cols), row-major.
  uint64_t cols = 0, block_rows = 0, block_cols = 0;
};

enum class ShardMode : uint8_t { Write = 0, Verify = 1 };

// What a shard's checksum covers: nothing, the sampled ranges of ShardTask, or every byte.
enum class ChecksumMode : uint8_t { None = 0, Sample = 1, Full = 2 };

struct ShardTask {
  std::string path;  // final path; written as path + ".partial"
  ShardMode mode = ShardMode::Write;
  std::string header;  // Write: the exact header bytes (length prefix included)
  uint64_t file_size = 0;
  std::string sidecar_path;      // Write: written (atomically) before the rename, if not empty
  std::string sidecar_template;  // "@CHECKSUM@" is replaced by the checksum's 32 hex digits
  std::vector<TensorTask> tensors;
};

// A source file and the identity (sources.py's FileStat) its header was read with: the engine
// opens it, refuses anything that is not that very file, and compares size, mtime and ctime again
// before each chunk that reads it and before each shard is renamed into place. ctime is set by
// the kernel on every write and every utime(), so an edit that restores the mtime is still seen.
struct SourceFile {
  std::string path;
  uint64_t size;  // the size the headers were validated against
  uint64_t dev = 0, ino = 0;
  int64_t mtime_ns = 0, ctime_ns = 0;
  bool has_identity = false;  // false: only the size is known (tests building jobs by hand)
};

struct Options {
  int threads = 2;
  uint64_t buffer_bytes = 16 << 20;  // per worker; transforms use buffer_bytes / 8 elements
  uint64_t copy_chunk = 64 << 20;    // bytes per in-kernel copy work item (no user memory)
  bool copy_file_range = true;       // else pread/pwrite through the buffer
  bool sparse = true;                // skip source holes (SEEK_DATA / SEEK_HOLE)
  bool writeback = true;             // start writeback as chunks complete (sync_file_range)
  bool drop_written = true;          // once written back, drop output pages from the page cache
  uint64_t drop_lag = 256 << 20;     // bytes per shard written since, before a range is dropped
  bool fsync = true;
  ChecksumMode checksum = ChecksumMode::Sample;
  bool check_finite = true;  // refuse inf/NaN computed from finite sources (Engine::check_finite)
  uint32_t test_chunk_delay_us = 0;  // sleep after each write chunk: lets tests interrupt a tiny job midway
  // Output folders as open fds (owned by the engine; -1: open the folder named in each path).
  // Shards and sidecars are created inside them by name with O_EXCL | O_NOFOLLOW (after unlinking
  // whatever had the name) and renamed with renameat, so no symbolic link is ever followed.
  int out_dir_fd = -1;
  int sidecar_dir_fd = -1;
};

struct Failure {
  std::string message, path, tensor;
  int err = 0;
  std::string kind;  // "source", "output" or "job"
};

struct Job {
  std::vector<SourceFile> files;
  std::vector<ShardTask> shards;
  Options options;
};

class Engine {
 public:
  explicit Engine(Job job);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  void start();
  // Block up to timeout_s (negative: forever); true once every worker has stopped and the
  // leftovers of a failed or cancelled run are removed.
  bool wait(double timeout_s);
  void cancel();

  uint64_t bytes_done() const { return bytes_done_.load(std::memory_order_relaxed); }
  bool failed() const;
  Failure failure() const;
  bool cancelled() const { return cancelled_.load(); }
  // Indices of the shards finished (renamed into place, or verified), with their checksums.
  std::vector<std::pair<uint32_t, Checksum>> finished() const;

 private:
  struct Chunk {
    uint32_t shard = 0, tensor = 0;
    uint64_t begin = 0, end = 0;  // bytes: within the tensor (write) or the file (verify)
    bool verify = false;
    bool sampled = false;    // verify: the shard's whole sample (ChecksumMode::Sample)
    bool copy_lane = false;  // an in-kernel copy: holds the shard's single copy lane
  };
  struct ShardState {
    int fd = -1;
    bool opened = false, done = false, renamed = false;
    uint64_t write_left = 0, verify_left = 0;  // guarded by mu_ (as are the next three)
    uint32_t next_tensor = 0;                   // the shard's cursor: next chunk to hand out
    uint64_t next_offset = 0;
    bool copying = false;                       // a worker is copying into this file
    std::deque<std::pair<uint64_t, uint64_t>> undropped;  // written ranges still in the page cache
    uint64_t undropped_bytes = 0;
    std::vector<uint8_t> sampled;  // per MiB: its sampled block was hashed before being dropped
    std::vector<uint64_t> edge_words;           // guarded by mu_: words only partly inside a piece
    std::atomic<uint64_t> sum_a{0}, sum_b{0};
  };
  struct Output {
    uint32_t shard;
    int fd;
    std::string path;  // the .partial file, for messages
  };
  struct Stat {
    uint64_t size;
    int64_t mtime_ns, ctime_ns;
  };

  void worker();
  bool next_chunk(Chunk& c, std::unique_lock<std::mutex>& lk);
  bool take_chunk(uint32_t s, Chunk& c);
  void open_shard(uint32_t s);
  void write_chunk(const Chunk& c, unsigned char* buf);
  void verify_chunk(const Chunk& c, unsigned char* buf);
  bool next_verify_chunk(Chunk& c);
  Checksum sample_sum(int fd, uint64_t size, uint64_t header_len, const std::string& path, unsigned char* buf,
                      const std::vector<uint8_t>* done = nullptr);
  bool full_checksum() const { return job_.options.checksum == ChecksumMode::Full; }
  void hash_piece(uint32_t s, uint64_t file_off, const unsigned char* data, uint64_t n, bool locked = false);
  Checksum edge_sum(uint32_t s, unsigned char* buf);
  void finalize(uint32_t s, unsigned char* buf);
  void copy_bytes(const TensorTask& t, const Output& out, uint64_t begin, uint64_t end, unsigned char* buf);
  void transform(const TensorTask& t, const Output& out, uint64_t begin, uint64_t end, unsigned char* buf);
  void dequant(const TensorTask& t, const Output& out, uint64_t begin, uint64_t end, unsigned char* buf);
  // Weight elements [first, first + n) of pair p as f32 (into acc, or added to it) and each element's scale.
  void dequant_pair(const TensorTask& t, size_t p, uint64_t first, uint64_t n, unsigned char* raw,
                    std::vector<float>& scale, float* acc, bool add, std::vector<uint8_t>* finite);
  void copy_range(const TensorTask& t, int in_fd, uint64_t in_off, const Output& out, uint64_t out_off, uint64_t n,
                  unsigned char* buf);
  bool all_holes(const TensorTask& t, uint64_t first_elem, uint64_t n_elems);
  void drop_written(uint32_t s, uint64_t begin, uint64_t end, unsigned char* buf);
  void write_skipping_zero_pages(const Output& out, const unsigned char* data, uint64_t n, uint64_t file_off,
                                 const std::string& tensor);
  void check_source(uint32_t file, const std::string& tensor);
  void check_finite(const TensorTask& t, const unsigned char* out, uint64_t first, uint64_t n, unsigned char* raw);
  void fail(const Failure& f);
  void cleanup();
  void finish_without_workers();
  uint64_t chunk_bytes(const TensorTask& t) const;
  bool stopping() const { return stop_.load(std::memory_order_relaxed); }
  std::string partial_path(uint32_t s) const { return job_.shards[s].path + ".partial"; }
  std::string partial_name(uint32_t s) const { return base_name(job_.shards[s].path) + ".partial"; }
  static std::string base_name(const std::string& path);

  Job job_;
  std::vector<int> src_fds_;
  std::vector<Stat> src_stat_;
  std::vector<std::unique_ptr<ShardState>> state_;
  std::vector<int> dir_fds_;      // per shard: its folder (openat / renameat, the fsync after rename)
  std::vector<int> sidecar_fds_;  // per shard: its sidecar's folder (-1: none)
  std::vector<int> owned_fds_;    // folder fds the destructor closes
  std::vector<std::thread> threads_;

  mutable std::mutex mu_;
  std::condition_variable cv_;       // workers: work or stop
  std::condition_variable done_cv_;  // waiters: finished_
  uint32_t verify_shard_ = 0;  // Verify mode cursor: shard and offset of the next range
  uint64_t verify_offset_ = 0;
  std::vector<uint32_t> active_;  // open shards with chunks not yet handed out, in file order
  uint32_t next_shard_ = 0;       // the next shard to open
  uint32_t shards_done_ = 0;
  int workers_left_ = 0;
  bool finished_ = false, started_ = false;
  bool has_failure_ = false;
  Failure failure_;
  std::vector<std::pair<uint32_t, Checksum>> finished_list_;

  std::atomic<bool> stop_{false}, cancelled_{false}, use_copy_file_range_{true};
  std::atomic<uint64_t> bytes_done_{0};
};

// Checksum of one whole file, holes skipped (used by tests; resume uses Engine in Verify mode).
Checksum checksum_file(const std::string& path, uint64_t buffer_bytes);

}  // namespace tli
