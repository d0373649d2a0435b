// The streaming engine's thread pool, work queue and shard life cycle (see engine.h, docs/engine.md).
//
// Work items, handed out in file order so that the disk sees long sequential runs:
//   write chunk   part of one output tensor: an in-kernel copy of up to copy_chunk bytes (source
//                 holes skipped), or up to buffer_bytes / 8 elements transformed through f32
//   verify range  a word-aligned part of a finished file (Verify mode, for --resume), read back
//                 and checksummed
// Checksums of written shards: by default (Sample) the sampled ranges are read back when the shard
// is complete, a few MB per GB. In Full mode every piece of output is hashed while it is in the
// worker's buffer (transforms) or read once more from the page cache right after its in-kernel
// copy. Pieces start and end anywhere, the checksum works on 8-byte words, so each piece adds its
// whole words and records the word index at each unaligned end; those few words are read back
// from the finished file (they are complete by then) and added once each.
#include "engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>

namespace tli {
namespace {

constexpr uint64_t kMaxCopyCall = 1ull << 30;

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns a pointer to the message (maybe not into buf).
  const char* msg = strerror_r(err, buf, sizeof buf);
  return std::string(msg) + " (errno " + std::to_string(err) + ")";
}

Failure output_failure(const std::string& what, const std::string& path, const std::string& tensor, int err) {
  return Failure{what + ": " + errno_text(err), path, tensor, err, "output"};
}

Failure source_failure(const std::string& what, const std::string& path, const std::string& tensor, int err = 0) {
  return Failure{err ? what + ": " + errno_text(err) : what, path, tensor, err, "source"};
}

bool is_output_errno(int err) { return err == ENOSPC || err == EFBIG || err == EDQUOT || err == EROFS; }

void pwrite_all(int fd, const unsigned char* data, uint64_t n, uint64_t off, const std::string& path,
                const std::string& tensor) {
  while (n > 0) {
    const ssize_t r = ::pwrite(fd, data, std::min<uint64_t>(n, kMaxCopyCall), off_t(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw output_failure("cannot write output", path, tensor, errno);
    }
    data += r;
    n -= uint64_t(r);
    off += uint64_t(r);
  }
}

// Read exactly n bytes; a short read means the file is shorter than its header promised.
// `kind` ("source" or "output") says whose fault a failure is.
void pread_all(int fd, unsigned char* data, uint64_t n, uint64_t off, const std::string& path,
               const std::string& tensor, const char* kind) {
  uint64_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, data + got, n - got, off_t(off + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Failure{std::string("cannot read ") + kind + ": " + errno_text(errno), path, tensor, errno, kind};
    }
    if (r == 0) {
      throw Failure{std::string(kind) + " ended early: read " + std::to_string(got) + " of " + std::to_string(n) +
                        " bytes at offset " + std::to_string(off) + " (file truncated or changed during the run)",
                    path, tensor, 0, kind};
    }
    got += uint64_t(r);
  }
}

// Next data extent at or after pos, clipped to [pos, end): returns false when [pos, end) is a hole.
// File systems without SEEK_DATA report the whole file as data.
bool next_data(int fd, uint64_t pos, uint64_t end, uint64_t& data, uint64_t& hole) {
  const off_t d = ::lseek(fd, off_t(pos), SEEK_DATA);
  if (d < 0) {
    if (errno == ENXIO) return false;  // no data after pos
    data = pos;
    hole = end;
    return true;
  }
  if (uint64_t(d) >= end) return false;
  const off_t h = ::lseek(fd, d, SEEK_HOLE);
  data = uint64_t(d);
  hole = h < 0 ? end : std::min<uint64_t>(uint64_t(h), end);
  return true;
}

// Checksum [begin, end) of fd (begin % 8 == 0; end % 8 == 0 or end is the file's end), holes skipped.
Checksum checksum_range(int fd, uint64_t begin, uint64_t end, unsigned char* buf, uint64_t buf_bytes,
                        const std::string& path, const std::atomic<bool>* stop) {
  Checksum c;
  uint64_t pos = begin;
  while (pos < end) {
    uint64_t data, hole;
    if (!next_data(fd, pos, end, data, hole)) break;
    data &= ~uint64_t(7);  // extents are block-aligned; keep whole words anyway
    hole = std::min(end, (hole + 7) & ~uint64_t(7));
    for (uint64_t off = data; off < hole;) {
      if (stop && stop->load(std::memory_order_relaxed)) return c;
      const uint64_t n = std::min(buf_bytes, hole - off);
      pread_all(fd, buf, n, off, path, "", "output");
      checksum_add(c, buf, n, off / 8);
      off += n;
    }
    pos = hole;
  }
  return c;
}

int64_t mtime_ns(const struct stat& st) { return int64_t(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec; }
int64_t ctime_ns(const struct stat& st) { return int64_t(st.st_ctim.tv_sec) * 1000000000LL + st.st_ctim.tv_nsec; }

std::string dirname_of(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string hex_checksum(const Checksum& c) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(c.a),
                static_cast<unsigned long long>(c.b));
  return buf;
}

// A new file `name` in the folder dir_fd: whatever had that name is unlinked first (a link
// itself, never its target), then it is created with O_EXCL | O_NOFOLLOW, so a planted symbolic
// link or a hard link to someone else's file is never written through.
int create_in(int dir_fd, const std::string& name, int flags, const std::string& path_for_messages) {
  if (::unlinkat(dir_fd, name.c_str(), 0) != 0 && errno != ENOENT)
    throw output_failure("cannot remove the old file", path_for_messages, "", errno);
  const int fd = ::openat(dir_fd, name.c_str(), flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) throw output_failure("cannot create", path_for_messages, "", errno);
  return fd;
}

// True when the entry `name` of dir_fd is still the file open as fd: nothing else replaced it. A
// file is renamed into place (or removed) only then: never one this run did not write.
bool still_ours(int dir_fd, const std::string& name, int fd) {
  struct stat by_name{}, by_fd{};
  if (::fstatat(dir_fd, name.c_str(), &by_name, AT_SYMLINK_NOFOLLOW) != 0 || ::fstat(fd, &by_fd) != 0) return false;
  return by_name.st_dev == by_fd.st_dev && by_name.st_ino == by_fd.st_ino;
}

Failure replaced_failure(const std::string& path) {
  return Failure{"was replaced by another process while this run wrote it; not renaming a file this run did "
                 "not write (is another tli run writing this folder?)",
                 path, "", 0, "output"};
}

void write_file_atomic(int dir_fd, const std::string& path, const std::string& content) {
  const auto slash = path.rfind('/');
  const std::string name = slash == std::string::npos ? path : path.substr(slash + 1);
  const std::string tmp = name + ".tmp";
  const int fd = create_in(dir_fd, tmp, O_WRONLY, path + ".tmp");
  try {
    pwrite_all(fd, reinterpret_cast<const unsigned char*>(content.data()), content.size(), 0, path, "");
    if (::fsync(fd) != 0) throw output_failure("fsync failed", path, "", errno);
    if (!still_ours(dir_fd, tmp, fd)) throw replaced_failure(path + ".tmp");
  } catch (...) {
    if (still_ours(dir_fd, tmp, fd)) ::unlinkat(dir_fd, tmp.c_str(), 0);
    ::close(fd);
    throw;
  }
  ::close(fd);
  if (::renameat(dir_fd, tmp.c_str(), dir_fd, name.c_str()) != 0)
    throw output_failure("cannot rename into place", path, "", errno);
}

bool is_regular_fd(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

Engine::Engine(Job job) : job_(std::move(job)) {
  // The folder fds handed in are ours from here on (bindings.cpp dups them).
  if (job_.options.out_dir_fd >= 0) owned_fds_.push_back(job_.options.out_dir_fd);
  if (job_.options.sidecar_dir_fd >= 0) owned_fds_.push_back(job_.options.sidecar_dir_fd);
  use_copy_file_range_ = job_.options.copy_file_range;
  // Buffers hold whole words and, for transforms, 4-byte accumulators plus the read bytes.
  job_.options.buffer_bytes = std::max<uint64_t>(job_.options.buffer_bytes & ~uint64_t(4095), 4096);
  job_.options.copy_chunk = std::max<uint64_t>(job_.options.copy_chunk, 4096);
  job_.options.threads = std::max(1, job_.options.threads);
  for (size_t i = 0; i < job_.shards.size(); ++i) state_.push_back(std::make_unique<ShardState>());
}

Engine::~Engine() {
  cancel();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  for (int fd : src_fds_)
    if (fd >= 0) ::close(fd);
  for (int fd : owned_fds_)
    if (fd >= 0) ::close(fd);
}

std::string Engine::base_name(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

uint64_t Engine::chunk_bytes(const TensorTask& t) const {
  switch (t.op) {
    case OpKind::Zeros:
      return std::max<uint64_t>(t.nbytes, 1);
    case OpKind::ByteCopy:
      return job_.options.copy_chunk;
    default:
      return (job_.options.buffer_bytes / 8) * uint64_t(itemsize(t.dtype));
  }
}

void Engine::start() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (started_) return;
    started_ = true;
  }
  try {
    for (const SourceFile& f : job_.files) {
      // O_NONBLOCK: a FIFO swapped in under a source's name must not block the open.
      const int fd = ::open(f.path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
      if (fd < 0) throw source_failure("cannot open source", f.path, "", errno);
      src_fds_.push_back(fd);
      struct stat st;
      if (::fstat(fd, &st) != 0) throw source_failure("cannot stat source", f.path, "", errno);
      if (!S_ISREG(st.st_mode)) throw source_failure("source is not a regular file", f.path, "");
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      if (uint64_t(st.st_size) != f.size)
        throw source_failure("source file changed since its header was read (" + std::to_string(f.size) + " -> " +
                                 std::to_string(st.st_size) + " bytes)",
                             f.path, "");
      if (f.has_identity) {
        if (uint64_t(st.st_dev) != f.dev || uint64_t(st.st_ino) != f.ino)
          throw source_failure("source file was replaced by another file since its header was read", f.path, "");
        if (mtime_ns(st) != f.mtime_ns || ctime_ns(st) != f.ctime_ns)
          throw source_failure(
              "source file was modified since its header was read (mtime or ctime changed); nothing was written",
              f.path, "");
      }
      src_stat_.push_back({uint64_t(st.st_size), mtime_ns(st), ctime_ns(st)});
      ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    std::map<std::string, int> dirs;
    auto dir_fd_of = [&](const std::string& path, int given) {
      if (given >= 0) return given;
      const std::string dir = dirname_of(path);
      if (!dirs.count(dir)) {
        const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) throw output_failure("cannot open output folder", dir, "", errno);
        owned_fds_.push_back(fd);
        dirs[dir] = fd;
      }
      return dirs[dir];
    };
    for (size_t s = 0; s < job_.shards.size(); ++s) {
      ShardTask& sh = job_.shards[s];
      ShardState& st = *state_[s];
      dir_fds_.push_back(dir_fd_of(sh.path, job_.options.out_dir_fd));
      sidecar_fds_.push_back(sh.sidecar_path.empty() ? -1 : dir_fd_of(sh.sidecar_path, job_.options.sidecar_dir_fd));
      if (sh.mode == ShardMode::Write) {
        if (sh.tensors.empty()) throw Failure{"shard has no tensors", sh.path, "", 0, "job"};
        for (const TensorTask& t : sh.tensors) {
          const uint64_t cb = chunk_bytes(t);
          st.write_left += t.nbytes == 0 ? 1 : (t.nbytes + cb - 1) / cb;
          for (const SourceRef& r : t.sources)
            if (r.file >= job_.files.size()) throw Failure{"bad source file index", sh.path, t.name, 0, "job"};
        }
      } else {
        st.fd = ::openat(dir_fds_[s], base_name(sh.path).c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (st.fd < 0) throw output_failure("cannot open for verification", sh.path, "", errno);
        st.opened = true;
        if (!is_regular_fd(st.fd)) throw Failure{"not a regular file", sh.path, "", 0, "output"};
        struct stat fs;
        if (::fstat(st.fd, &fs) != 0 || uint64_t(fs.st_size) != sh.file_size)
          throw Failure{"size changed before verification", sh.path, "", 0, "output"};
        const uint64_t step = job_.options.buffer_bytes;
        st.verify_left = job_.options.checksum == ChecksumMode::Sample || sh.file_size == 0
                             ? 1
                             : (sh.file_size + step - 1) / step;
      }
    }
  } catch (const Failure& f) {
    fail(f);
    finish_without_workers();
    return;
  } catch (const std::exception& e) {
    fail(Failure{std::string("internal error: ") + e.what(), "", "", 0, "job"});
    finish_without_workers();
    return;
  }
  if (job_.shards.empty()) {
    finish_without_workers();
    return;
  }
  std::unique_lock<std::mutex> lk(mu_);
  workers_left_ = job_.options.threads;
  for (int i = 0; i < job_.options.threads; ++i) {
    try {
      threads_.emplace_back([this] { worker(); });
    } catch (const std::exception& e) {  // e.g. out of threads: stop the ones started
      workers_left_ = i;
      lk.unlock();
      fail(Failure{std::string("cannot start worker threads: ") + e.what(), "", "", 0, "job"});
      if (i == 0) finish_without_workers();
      return;
    }
  }
}

// A run that ends before any worker starts: nothing to wait for but the cleanup.
void Engine::finish_without_workers() {
  cleanup();
  std::lock_guard<std::mutex> lk(mu_);
  finished_ = true;
  done_cv_.notify_all();
}

bool Engine::wait(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (timeout_s < 0) {
    done_cv_.wait(lk, [this] { return finished_; });
  } else {
    done_cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [this] { return finished_; });
  }
  return finished_;
}

void Engine::cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  if (!finished_) cancelled_ = true;
  stop_ = true;
  cv_.notify_all();
}

bool Engine::failed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return has_failure_;
}

Failure Engine::failure() const {
  std::lock_guard<std::mutex> lk(mu_);
  return failure_;
}

std::vector<std::pair<uint32_t, Checksum>> Engine::finished() const {
  std::lock_guard<std::mutex> lk(mu_);
  return finished_list_;
}

void Engine::fail(const Failure& f) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!has_failure_ && !cancelled_) {
    has_failure_ = true;
    failure_ = f;
  }
  stop_ = true;
  cv_.notify_all();
}

void Engine::worker() {
  std::unique_ptr<unsigned char[]> buf(new unsigned char[job_.options.buffer_bytes]);
  for (;;) {
    Chunk c;
    bool got = false;
    Failure err;
    bool has_err = false;
    {
      std::unique_lock<std::mutex> lk(mu_);
      for (;;) {
        if (stopping()) break;
        try {
          got = next_chunk(c, lk);
        } catch (const Failure& f) {
          err = f;
          has_err = true;
          break;
        }
        if (got || shards_done_ == job_.shards.size()) break;
        cv_.wait(lk);
      }
    }
    if (has_err) fail(err);
    if (!got) break;
    try {
      if (c.verify) {
        verify_chunk(c, buf.get());
      } else {
        write_chunk(c, buf.get());
      }
    } catch (const Failure& f) {
      fail(f);
      break;
    } catch (const std::exception& e) {
      fail(Failure{std::string("internal error: ") + e.what(), job_.shards[c.shard].path, "", 0, "job"});
      break;
    }
  }
  bool last;
  {
    std::lock_guard<std::mutex> lk(mu_);
    last = --workers_left_ == 0;
  }
  if (last) {
    cleanup();
    std::lock_guard<std::mutex> lk(mu_);
    finished_ = true;
    done_cv_.notify_all();
  }
}

// Called with mu_ held. Verify ranges first; then the next chunk of an open shard, each shard's
// chunks in file order; then a shard not yet opened. At most one worker copies into a given file
// at a time: ext4 (and most file systems) serialise writers of one file on its inode lock, so a
// second copier only burns CPU; it takes another shard instead. Transforms are CPU work and
// share a file freely.
bool Engine::next_chunk(Chunk& c, std::unique_lock<std::mutex>&) {
  if (next_verify_chunk(c)) return true;
  for (size_t k = 0; k < active_.size(); ++k) {
    if (take_chunk(active_[k], c)) {
      if (state_[c.shard]->next_tensor >= job_.shards[c.shard].tensors.size())
        active_.erase(active_.begin() + long(k));  // every chunk handed out
      return true;
    }
  }
  while (next_shard_ < job_.shards.size()) {
    const uint32_t s = next_shard_++;
    if (job_.shards[s].mode != ShardMode::Write) continue;
    open_shard(s);
    active_.push_back(s);
    const bool got = take_chunk(s, c);
    assert(got);  // a fresh shard has chunks and a free copy lane
    (void)got;
    if (state_[s]->next_tensor >= job_.shards[s].tensors.size()) active_.pop_back();
    return got;
  }
  return false;
}

// Called with mu_ held: the shard's next chunk, unless it is a copy and another worker is copying
// into this file.
bool Engine::take_chunk(uint32_t s, Chunk& c) {
  ShardState& st = *state_[s];
  const ShardTask& sh = job_.shards[s];
  const TensorTask& t = sh.tensors[st.next_tensor];
  const bool copy = t.op == OpKind::ByteCopy && t.nbytes > 0;
  if (copy && st.copying) return false;
  c.shard = s;
  c.tensor = st.next_tensor;
  c.begin = st.next_offset;
  c.end = std::min(t.nbytes, st.next_offset + chunk_bytes(t));
  c.verify = false;
  c.copy_lane = copy;
  st.copying = st.copying || copy;
  st.next_offset = c.end;
  if (st.next_offset >= t.nbytes) {
    ++st.next_tensor;
    st.next_offset = 0;
  }
  return true;
}

// Called with mu_ held (cheap: create, size, header).
void Engine::open_shard(uint32_t s) {
  const ShardTask& sh = job_.shards[s];
  ShardState& st = *state_[s];
  const std::string partial = partial_path(s);
  st.fd = create_in(dir_fds_[s], partial_name(s), O_RDWR, partial);
  st.opened = true;
  st.sampled.assign(sh.file_size / kSampleStride + 1, 0);
  // Full size up front: whatever is never written (zero tensors, source holes) stays a hole.
  if (::ftruncate(st.fd, off_t(sh.file_size)) != 0) throw output_failure("cannot size output", partial, "", errno);
  const auto* header = reinterpret_cast<const unsigned char*>(sh.header.data());
  pwrite_all(st.fd, header, sh.header.size(), 0, partial, "");
  hash_piece(s, 0, header, sh.header.size(), /*locked=*/true);
}

void Engine::hash_piece(uint32_t s, uint64_t file_off, const unsigned char* data, uint64_t n, bool locked) {
  if (!full_checksum() || n == 0) return;
  ShardState& st = *state_[s];
  const uint64_t end = file_off + n;
  const uint64_t first = (file_off + 7) & ~uint64_t(7), last = end & ~uint64_t(7);  // whole words: [first, last)
  if (first < last) {
    Checksum c;
    checksum_add(c, data + (first - file_off), last - first, first / 8);
    st.sum_a.fetch_add(c.a, std::memory_order_relaxed);
    st.sum_b.fetch_add(c.b, std::memory_order_relaxed);
  }
  if (file_off % 8 == 0 && end % 8 == 0) return;
  std::unique_lock<std::mutex> lk(mu_, std::defer_lock);
  if (!locked) lk.lock();
  if (file_off % 8) st.edge_words.push_back(file_off / 8);
  if (end % 8) st.edge_words.push_back(end / 8);
}

// The words recorded by hash_piece, each read back once from the finished file.
Checksum Engine::edge_sum(uint32_t s, unsigned char* buf) {
  ShardState& st = *state_[s];
  std::vector<uint64_t> words;
  {
    std::lock_guard<std::mutex> lk(mu_);
    words.swap(st.edge_words);
  }
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  Checksum c;
  const uint64_t size = job_.shards[s].file_size;
  for (const uint64_t w : words) {
    const uint64_t n = std::min<uint64_t>(8, size - 8 * w);
    pread_all(st.fd, buf, n, 8 * w, partial_path(s), "", "output");
    checksum_add(c, buf, n, w);
  }
  return c;
}

void Engine::check_source(uint32_t file, const std::string& tensor) {
  struct stat st;
  const SourceFile& f = job_.files[file];
  if (::fstat(src_fds_[file], &st) != 0) throw source_failure("cannot stat source", f.path, tensor, errno);
  const Stat& was = src_stat_[file];
  if (uint64_t(st.st_size) != was.size)
    throw source_failure("source file changed size during the run (" + std::to_string(was.size) + " -> " +
                             std::to_string(st.st_size) + " bytes); output discarded",
                         f.path, tensor);
  if (mtime_ns(st) != was.mtime_ns)
    throw source_failure("source file was modified during the run (mtime changed); output discarded", f.path, tensor);
  if (ctime_ns(st) != was.ctime_ns)
    throw source_failure(
        "source file was modified during the run (ctime changed, even if the mtime was put back); output discarded",
        f.path, tensor);
}

void Engine::write_chunk(const Chunk& c, unsigned char* buf) {
  const TensorTask& t = job_.shards[c.shard].tensors[c.tensor];
  const Output out{c.shard, state_[c.shard]->fd, partial_path(c.shard)};
  if (t.op == OpKind::ByteCopy) {
    copy_bytes(t, out, c.begin, c.end, buf);
  } else if (t.op != OpKind::Zeros) {
    transform(t, out, c.begin, c.end, buf);
  }
  if (job_.options.test_chunk_delay_us)
    std::this_thread::sleep_for(std::chrono::microseconds(job_.options.test_chunk_delay_us));
  if (stopping()) return;
  const bool wrote = t.op != OpKind::Zeros && c.end > c.begin;
  if (job_.options.writeback && wrote)
    ::sync_file_range(out.fd, off_t(t.out_offset + c.begin), off_t(c.end - c.begin), SYNC_FILE_RANGE_WRITE);
  if (job_.options.drop_written && wrote) {
    // Drop what was written more than drop_lag bytes ago in this shard from the cache.
    std::vector<std::pair<uint64_t, uint64_t>> older;
    {
      std::lock_guard<std::mutex> lk(mu_);
      ShardState& st = *state_[c.shard];
      st.undropped.emplace_back(t.out_offset + c.begin, t.out_offset + c.end);
      st.undropped_bytes += c.end - c.begin;
      while (!st.undropped.empty() &&
             st.undropped_bytes - (st.undropped.front().second - st.undropped.front().first) >= job_.options.drop_lag) {
        older.push_back(st.undropped.front());
        st.undropped_bytes -= st.undropped.front().second - st.undropped.front().first;
        st.undropped.pop_front();
      }
    }
    for (const auto& [a, b] : older) drop_written(c.shard, a, b, buf);
  }
  bytes_done_.fetch_add(c.end - c.begin, std::memory_order_relaxed);
  bool last;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ShardState& st = *state_[c.shard];
    last = --st.write_left == 0;
    if (c.copy_lane) {
      st.copying = false;
      cv_.notify_all();
    }
  }
  if (last) finalize(c.shard, buf);
}

// Drop [begin, end) of shard s from the page cache. Growing the page cache by the whole output is
// what made large conversions slow on the benchmark VM: a 3B-shaped conversion spent 13 s in the
// kernel with the pages kept and 5 s with them dropped. No wait for the writeback: waiting made
// the copier idle while the disk drained (+50% on the 1B shape); the range is 256 MiB behind the
// writer, so it is mostly written back, and pages still in flight stay cached until the shard's
// final fsync and drop. Whole pages only (the edges are shared with neighbouring chunks), and the
// range is dropped whole: keeping single pages inside it splits the kernel's large folios, which
// cost more than it saved. Sampled-checksum blocks inside the range are hashed first (they are
// still cached); finalize reads the header, the tail and any block not hashed here.
void Engine::drop_written(uint32_t s, uint64_t begin, uint64_t end, unsigned char* buf) {
  constexpr uint64_t kPage = 4096;
  const ShardTask& sh = job_.shards[s];
  ShardState& st = *state_[s];
  const uint64_t a = (begin + kPage - 1) / kPage * kPage, b = end / kPage * kPage;
  if (a >= b) return;
  if (job_.options.checksum == ChecksumMode::Sample) {
    // A block merged with the header or the tail range is left to finalize (sample_ranges merges
    // ranges that touch), so every word is counted once.
    const uint64_t header_end = std::min(sh.file_size, (uint64_t(sh.header.size()) + 7) & ~uint64_t(7));
    const uint64_t tail_begin = (sh.file_size > kSampleBlock ? sh.file_size - kSampleBlock : 0) & ~uint64_t(7);
    Checksum sum;
    for (uint64_t k = (a + kSampleStride - 1) / kSampleStride * kSampleStride; k + kSampleBlock <= b;
         k += kSampleStride) {
      if (k <= header_end || k + kSampleBlock >= tail_begin) continue;
      pread_all(st.fd, buf, kSampleBlock, k, partial_path(s), "", "output");
      checksum_add(sum, buf, kSampleBlock, k / 8);
      st.sampled[k / kSampleStride] = 1;
    }
    st.sum_a.fetch_add(sum.a, std::memory_order_relaxed);
    st.sum_b.fetch_add(sum.b, std::memory_order_relaxed);
  }
  ::posix_fadvise(st.fd, off_t(a), off_t(b - a), POSIX_FADV_DONTNEED);
}

// Called with mu_ held. Verify mode: a whole shard's sample, or the next buffer-sized range.
bool Engine::next_verify_chunk(Chunk& c) {
  const uint64_t step = job_.options.buffer_bytes;  // a multiple of 4096: ranges stay word-aligned
  while (verify_shard_ < job_.shards.size()) {
    const uint32_t s = verify_shard_;
    const ShardTask& sh = job_.shards[s];
    if (sh.mode != ShardMode::Verify) {
      ++verify_shard_;
      continue;
    }
    c.shard = s;
    c.verify = true;
    c.sampled = job_.options.checksum == ChecksumMode::Sample;
    c.begin = verify_offset_;
    c.end = c.sampled ? sh.file_size : std::min(sh.file_size, verify_offset_ + step);
    verify_offset_ = c.end;
    if (verify_offset_ >= sh.file_size) {
      ++verify_shard_;
      verify_offset_ = 0;
    }
    return true;
  }
  return false;
}

// The sample's ranges not hashed yet: `done` marks the 4 KiB blocks (by MiB index) drop_written hashed.
Checksum Engine::sample_sum(int fd, uint64_t size, uint64_t header_len, const std::string& path,
                            unsigned char* buf, const std::vector<uint8_t>* done) {
  Checksum sum;
  for (const auto& [begin, end] : sample_ranges(size, header_len)) {
    if (done && end - begin == kSampleBlock && begin % kSampleStride == 0 && (*done)[begin / kSampleStride])
      continue;
    const Checksum c = checksum_range(fd, begin, end, buf, job_.options.buffer_bytes, path, &stop_);
    sum.a += c.a;
    sum.b += c.b;
  }
  return sum;
}

void Engine::verify_chunk(const Chunk& c, unsigned char* buf) {
  ShardState& st = *state_[c.shard];
  const ShardTask& sh = job_.shards[c.shard];
  const std::string& path = sh.path;
  Checksum sum;
  if (c.sampled) {
    unsigned char head[8] = {0};
    uint64_t n = 0;
    if (sh.file_size >= 8) {
      pread_all(st.fd, head, 8, 0, path, "", "output");
      std::memcpy(&n, head, 8);
    }
    sum = sample_sum(st.fd, sh.file_size, std::min(sh.file_size, n > sh.file_size ? sh.file_size : 8 + n), path, buf);
  } else {
    sum = checksum_range(st.fd, c.begin, c.end, buf, job_.options.buffer_bytes, path, &stop_);
    if (job_.options.drop_written) ::posix_fadvise(st.fd, off_t(c.begin), off_t(c.end - c.begin), POSIX_FADV_DONTNEED);
  }
  if (stopping()) return;
  st.sum_a.fetch_add(sum.a, std::memory_order_relaxed);
  st.sum_b.fetch_add(sum.b, std::memory_order_relaxed);
  if (sh.mode == ShardMode::Verify) bytes_done_.fetch_add(c.end - c.begin, std::memory_order_relaxed);
  bool last;
  {
    std::lock_guard<std::mutex> lk(mu_);
    last = --st.verify_left == 0;
  }
  if (last) finalize(c.shard, buf);
}

void Engine::finalize(uint32_t s, unsigned char* buf) {
  const ShardTask& sh = job_.shards[s];
  ShardState& st = *state_[s];
  Checksum sum{st.sum_a.load(), st.sum_b.load()};
  if (sh.mode == ShardMode::Write) {
    const std::string partial = partial_path(s);
    if (full_checksum()) {
      const Checksum edges = edge_sum(s, buf);
      sum.a += edges.a;
      sum.b += edges.b;
    } else if (job_.options.checksum == ChecksumMode::Sample) {
      const Checksum rest = sample_sum(st.fd, sh.file_size, sh.header.size(), partial, buf, &st.sampled);
      sum.a += rest.a;
      sum.b += rest.b;
    }
    // The output is only as good as its sources were for the whole time it was being written.
    for (uint32_t f = 0; f < job_.files.size(); ++f) check_source(f, "");
    if (job_.options.fsync && ::fsync(st.fd) != 0) throw output_failure("fsync failed", partial, "", errno);
    if (job_.options.drop_written) ::posix_fadvise(st.fd, 0, 0, POSIX_FADV_DONTNEED);
    if (stopping()) return;
    if (!sh.sidecar_path.empty()) {
      std::string content = sh.sidecar_template;
      const auto at = content.find("@CHECKSUM@");
      if (at != std::string::npos)
        content.replace(at, 10, job_.options.checksum == ChecksumMode::None ? "none" : hex_checksum(sum));
      write_file_atomic(sidecar_fds_[s], sh.sidecar_path, content);
    }
    if (!still_ours(dir_fds_[s], partial_name(s), st.fd)) throw replaced_failure(partial);
    if (::renameat(dir_fds_[s], partial_name(s).c_str(), dir_fds_[s], base_name(sh.path).c_str()) != 0)
      throw output_failure("cannot rename into place", sh.path, "", errno);
    {
      std::lock_guard<std::mutex> lk(mu_);
      st.renamed = true;
    }
    if (job_.options.fsync) ::fsync(dir_fds_[s]);
  }
  std::lock_guard<std::mutex> lk(mu_);
  ::close(st.fd);
  st.fd = -1;
  st.done = true;
  ++shards_done_;
  finished_list_.emplace_back(s, sum);
  cv_.notify_all();
}

// Runs once, after the last worker stopped: close what is open, remove unfinished .partial files.
void Engine::cleanup() {
  std::lock_guard<std::mutex> lk(mu_);
  for (size_t s = 0; s < job_.shards.size(); ++s) {
    ShardState& st = *state_[s];
    // Remove the .partial this run created, and only that file (not one another process put there).
    const bool remove = job_.shards[s].mode == ShardMode::Write && st.opened && !st.renamed && st.fd >= 0 &&
                        still_ours(dir_fds_[s], partial_name(uint32_t(s)), st.fd);
    if (remove) ::unlinkat(dir_fds_[s], partial_name(uint32_t(s)).c_str(), 0);
    if (st.fd >= 0) {
      ::close(st.fd);
      st.fd = -1;
    }
  }
}

void Engine::copy_bytes(const TensorTask& t, const Output& out, uint64_t begin, uint64_t end, unsigned char* buf) {
  const SourceRef& src = t.sources[0];
  check_source(src.file, t.name);
  const int in_fd = src_fds_[src.file];
  const uint64_t in_begin = src.offset + begin, in_end = src.offset + end;
  if (!job_.options.sparse) {
    copy_range(t, in_fd, in_begin, out, t.out_offset + begin, end - begin, buf);
    return;
  }
  uint64_t pos = in_begin;
  while (pos < in_end && !stopping()) {
    uint64_t data, hole;
    if (!next_data(in_fd, pos, in_end, data, hole)) break;  // the rest is a hole: leave one
    copy_range(t, in_fd, data, out, t.out_offset + begin + (data - in_begin), hole - data, buf);
    pos = hole;
  }
}

void Engine::copy_range(const TensorTask& t, int in_fd, uint64_t in_off, const Output& out, uint64_t out_off,
                        uint64_t n, unsigned char* buf) {
  const SourceFile& src = job_.files[t.sources[0].file];
  while (n > 0 && !stopping()) {
    if (use_copy_file_range_.load(std::memory_order_relaxed)) {
      off64_t i = off64_t(in_off), o = off64_t(out_off);
      const ssize_t r = ::copy_file_range(in_fd, &i, out.fd, &o, std::min(n, kMaxCopyCall), 0);
      if (r < 0) {
        const int err = errno;
        if (err == EINTR) continue;
        if (err == EXDEV || err == ENOSYS || err == EOPNOTSUPP || err == EINVAL || err == EBADF) {
          use_copy_file_range_ = false;  // not between these files: copy through the buffer from now on
          continue;
        }
        if (is_output_errno(err)) throw output_failure("cannot write output", out.path, t.name, err);
        throw source_failure("in-kernel copy failed", src.path, t.name, err);
      }
      if (r == 0)
        throw source_failure("source ended early at offset " + std::to_string(in_off) +
                                 " (file truncated or changed during the run)",
                             src.path, t.name);
      // Hash what was copied: read it once more, from the page cache it was just copied from.
      for (uint64_t done = 0; full_checksum() && done < uint64_t(r);) {
        const uint64_t k = std::min(uint64_t(r) - done, job_.options.buffer_bytes);
        pread_all(in_fd, buf, k, in_off + done, src.path, t.name, "source");
        hash_piece(out.shard, out_off + done, buf, k);
        done += k;
      }
      in_off += uint64_t(r);
      out_off += uint64_t(r);
      n -= uint64_t(r);
    } else {
      const uint64_t k = std::min(n, job_.options.buffer_bytes);
      pread_all(in_fd, buf, k, in_off, src.path, t.name, "source");
      pwrite_all(out.fd, buf, k, out_off, out.path, t.name);
      hash_piece(out.shard, out_off, buf, k);
      in_off += k;
      out_off += k;
      n -= k;
    }
  }
}

bool Engine::all_holes(const TensorTask& t, uint64_t first_elem, uint64_t n_elems) {
  for (const SourceRef& r : t.sources) {
    const uint64_t sz = uint64_t(itemsize(r.dtype));
    const uint64_t begin = r.offset + first_elem * sz, end = begin + n_elems * sz;
    uint64_t data, hole;
    if (next_data(src_fds_[r.file], begin, end, data, hole)) return false;
  }
  return true;
}

void Engine::dequant_pair(const TensorTask& t, size_t p, uint64_t first, uint64_t n, unsigned char* raw,
                          std::vector<float>& scale, float* acc, bool add, std::vector<uint8_t>* finite) {
  const SourceRef& q = t.sources[2 * p];
  const SourceRef& s = t.sources[2 * p + 1];
  const uint64_t cols = t.cols, br = t.block_rows, bc = t.block_cols, grid_cols = (cols + bc - 1) / bc;
  const uint64_t g0 = first / cols / br, g1 = (first + n - 1) / cols / br;
  const uint64_t count = (g1 - g0 + 1) * grid_cols, ssz = uint64_t(itemsize(s.dtype));
  pread_all(src_fds_[q.file], raw, n, q.offset + first, job_.files[q.file].path, t.name, "source");
  std::vector<unsigned char> sraw(count * ssz);
  pread_all(src_fds_[s.file], sraw.data(), count * ssz, s.offset + g0 * grid_cols * ssz, job_.files[s.file].path,
            t.name, "source");
  scale.resize(count);
  widen(sraw.data(), s.dtype, scale.data(), count);
  // Row by row: the scale row of a weight row is fixed, its column block changes every bc elements.
  for (uint64_t k = 0; k < n;) {
    const uint64_t idx = first + k, r = idx / cols, c0 = idx % cols, len = std::min(cols - c0, n - k);
    const float* srow = scale.data() + (r / br - g0) * grid_cols;
    for (uint64_t c = c0; c < c0 + len; ++c, ++k) {
      const float w = fp8_to_f32(raw[k], q.dtype), f = srow[c / bc];
      if (finite) {
        (*finite)[k] &= uint8_t(std::isfinite(w) && std::isfinite(f));
      } else {
        const float v = w * f;
        acc[k] = add ? acc[k] + v : v;
      }
    }
  }
}

void Engine::dequant(const TensorTask& t, const Output& out, uint64_t begin, uint64_t end, unsigned char* buf) {
  const uint64_t osz = uint64_t(itemsize(t.dtype));
  const uint64_t first = begin / osz, n = (end - begin) / osz;
  const uint64_t max_elems = job_.options.buffer_bytes / 8;
  float* acc = reinterpret_cast<float*>(buf);
  unsigned char* raw = buf + 4 * max_elems;  // n FP8 bytes
  for (const SourceRef& r : t.sources) check_source(r.file, t.name);
  const size_t pairs = t.sources.size() / 2;
  std::vector<float> scale;
  for (size_t p = 0; p < pairs; ++p) dequant_pair(t, p, first, n, raw, scale, acc, p > 0, nullptr);
  if (pairs > 1) {
    const float count = float(pairs);
    for (uint64_t k = 0; k < n; ++k) acc[k] = acc[k] / count;
  }
  if (t.factor != 1.0) {
    const float f = float(t.factor);
    for (uint64_t k = 0; k < n; ++k) acc[k] = acc[k] * f;
  }
  narrow_in_place(acc, t.dtype, n);
  if (job_.options.check_finite && any_nonfinite(buf, t.dtype, n)) {
    // Overflow only where every weight and scale the element came from is finite (as check_finite).
    std::vector<uint8_t> bad(n);
    for (uint64_t k = 0; k < n; ++k) bad[k] = is_nonfinite_at(buf, t.dtype, k);
    for (size_t p = 0; p < pairs; ++p) dequant_pair(t, p, first, n, raw, scale, nullptr, false, &bad);
    for (uint64_t k = 0; k < n; ++k)
      if (bad[k])
        throw Failure{"non-finite result at element " + std::to_string(first + k) + " from finite source values", "",
                      t.name, 0, "overflow"};
  }
  write_skipping_zero_pages(out, buf, n * osz, t.out_offset + begin, t.name);
}

void Engine::transform(const TensorTask& t, const Output& out, uint64_t begin, uint64_t end, unsigned char* buf) {
  if (t.op == OpKind::Dequant) return dequant(t, out, begin, end, buf);
  const uint64_t osz = uint64_t(itemsize(t.dtype));
  const uint64_t first = begin / osz, n = (end - begin) / osz;
  const uint64_t max_elems = job_.options.buffer_bytes / 8;
  float* acc = reinterpret_cast<float*>(buf);
  unsigned char* raw = buf + 4 * max_elems;
  const bool reads = t.op == OpKind::Cast || t.op == OpKind::Scale || t.op == OpKind::Average;
  if (reads) {
    for (const SourceRef& r : t.sources) check_source(r.file, t.name);
    // Zero in gives +0 out unless a negative factor turns it into -0: then a source hole may stay one.
    const bool zero_stays_zero =
        t.op == OpKind::Cast || (std::isfinite(t.factor) && !std::signbit(t.factor) && t.value == 0.0);
    if (job_.options.sparse && zero_stays_zero && all_holes(t, first, n)) return;
  }
  switch (t.op) {
    case OpKind::Fill:
      std::fill(acc, acc + n, float(t.value));
      break;
    case OpKind::Uniform:
      uniform_f32(t.seed, t.bound, first, acc, n);
      break;
    default: {
      for (size_t i = 0; i < t.sources.size(); ++i) {
        const SourceRef& r = t.sources[i];
        const uint64_t isz = uint64_t(itemsize(r.dtype));
        pread_all(src_fds_[r.file], raw, n * isz, r.offset + first * isz, job_.files[r.file].path, t.name, "source");
        if (i == 0) {
          widen(raw, r.dtype, acc, n);
          if (t.has_pre_round) round_through(acc, t.pre_round, n);  // scale ops only (validate_plan)
        } else {
          widen_add(raw, r.dtype, acc, n);
        }
      }
      // Scale (and a scaled average): acc * f, or (acc + o) * f - o for a norm stored as scale - o.
      auto scale = [&](float f, float o) {
        if (o == 0.0f) {
          for (uint64_t k = 0; k < n; ++k) acc[k] = acc[k] * f;
        } else {
          for (uint64_t k = 0; k < n; ++k) acc[k] = (acc[k] + o) * f - o;
        }
      };
      if (t.op == OpKind::Scale) {
        scale(float(t.factor), float(t.value));
      } else if (t.op == OpKind::Average) {
        const float count = float(t.sources.size());
        for (uint64_t k = 0; k < n; ++k) acc[k] = acc[k] / count;
        if (t.factor != 1.0) scale(float(t.factor), float(t.value));
      }
    }
  }
  narrow_in_place(acc, t.dtype, n);
  check_finite(t, buf, first, n, raw);
  write_skipping_zero_pages(out, buf, n * osz, t.out_offset + begin, t.name);
}

// A computed element that is inf or NaN although every source element it came from is finite is
// an overflow (--alpha too large for the weights, a --dtype too narrow, ...): fail, naming the
// element, rather than write it. The common case is one pass over the output; only a chunk that
// holds non-finite values reads its sources again (into `raw`, free after narrowing) to tell an
// overflow from a NaN or inf that was already in the source.
void Engine::check_finite(const TensorTask& t, const unsigned char* out, uint64_t first, uint64_t n,
                          unsigned char* raw) {
  if (!job_.options.check_finite || !any_nonfinite(out, t.dtype, n)) return;
  std::vector<uint8_t> bad(n);
  for (uint64_t k = 0; k < n; ++k) bad[k] = is_nonfinite_at(out, t.dtype, k);
  for (const SourceRef& r : t.sources) {
    const uint64_t isz = uint64_t(itemsize(r.dtype));
    pread_all(src_fds_[r.file], raw, n * isz, r.offset + first * isz, job_.files[r.file].path, t.name, "source");
    for (uint64_t k = 0; k < n; ++k)
      if (bad[k] && is_nonfinite_at(raw, r.dtype, k)) bad[k] = 0;
  }
  for (uint64_t k = 0; k < n; ++k)
    if (bad[k])
      throw Failure{"non-finite result at element " + std::to_string(first + k) + " from finite source values", "",
                    t.name, 0, "overflow"};
}

// The file is new and all holes: pages of the result that are all zero need no write and stay
// holes (a source hole that a transform chunk only partly covers, a zero fill).
void Engine::write_skipping_zero_pages(const Output& out, const unsigned char* data, uint64_t n, uint64_t file_off,
                                       const std::string& tensor) {
  constexpr uint64_t kPage = 4096;
  auto all_zero = [](const unsigned char* p, uint64_t len) {
    uint64_t acc = 0, k = 0;
    for (; k + 8 <= len; k += 8) {
      uint64_t w;
      std::memcpy(&w, p + k, 8);
      acc |= w;
    }
    for (; k < len; ++k) acc |= p[k];
    return acc == 0;
  };
  auto flush = [&](uint64_t from, uint64_t to) {
    pwrite_all(out.fd, data + from, to - from, file_off + from, out.path, tensor);
    hash_piece(out.shard, file_off + from, data + from, to - from);
  };
  uint64_t run = n;  // start of the pending run of pages to write; n: none
  for (uint64_t pos = 0; pos < n;) {
    const uint64_t end = std::min(n, ((file_off + pos) / kPage + 1) * kPage - file_off);
    const bool zero = all_zero(data + pos, end - pos);
    if (!zero && run == n) run = pos;
    if (zero && run != n) {
      flush(run, pos);
      run = n;
    }
    pos = end;
  }
  if (run != n) flush(run, n);
}

Checksum checksum_file(const std::string& path, uint64_t buffer_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw output_failure("cannot open", path, "", errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw output_failure("cannot stat", path, "", err);
  }
  buffer_bytes = std::max<uint64_t>(buffer_bytes & ~uint64_t(7), 8);
  std::unique_ptr<unsigned char[]> buf(new unsigned char[buffer_bytes]);
  try {
    const Checksum c = checksum_range(fd, 0, uint64_t(st.st_size), buf.get(), buffer_bytes, path, nullptr);
    ::close(fd);
    return c;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

}  // namespace tli
