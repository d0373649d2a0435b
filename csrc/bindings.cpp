// Python bindings of the streaming engine: the only file that sees Python. It converts the job
// that tli_kernels/checkpoint/executor_native.py resolved (plain tuples) into engine structs and
// releases the GIL around anything that waits. All argument checking happens in Python.
#include <fcntl.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "engine.h"

namespace py = pybind11;

namespace {

// (file index, absolute offset, dtype code)
using SourceTuple = std::tuple<uint32_t, uint64_t, int>;
// (name, output offset, output bytes, dtype code, op code, factor, value, seed, bound, pre_round dtype code or -1,
//  sources, (cols, block rows, block cols) of a dequant op)
using TensorTuple = std::tuple<std::string, uint64_t, uint64_t, int, int, double, double, uint64_t, double, int,
                               std::vector<SourceTuple>, std::tuple<uint64_t, uint64_t, uint64_t>>;
// (path, size, dev, ino, mtime_ns, ctime_ns): a source file and the identity its header was read with
using FileTuple = std::tuple<std::string, uint64_t, uint64_t, uint64_t, int64_t, int64_t>;
// (final path, mode, header bytes, file size, sidecar path, sidecar template, tensors)
using ShardTuple = std::tuple<std::string, int, std::string, uint64_t, std::string, std::string, std::vector<TensorTuple>>;

// The engine owns the folder fds it is given: dup them (close-on-exec) so Python may close its own.
int dup_fd(int fd) {
  if (fd < 0) return -1;
  const int d = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) throw std::runtime_error("cannot duplicate the output folder's file descriptor");
  return d;
}

std::unique_ptr<tli::Engine> make_engine(const std::vector<FileTuple>& files, const std::vector<ShardTuple>& shards,
                                         int threads, uint64_t buffer_bytes, uint64_t copy_chunk, bool copy_file_range,
                                         bool sparse, bool writeback, bool fsync, int checksum,
                                         uint32_t test_chunk_delay_us, bool drop_written, uint64_t drop_lag,
                                         int out_dir_fd, int sidecar_dir_fd, bool check_finite) {
  tli::Job job;
  for (const auto& [path, size, dev, ino, mtime, ctime] : files) {
    tli::SourceFile f;
    f.path = path;
    f.size = size;
    f.dev = dev;
    f.ino = ino;
    f.mtime_ns = mtime;
    f.ctime_ns = ctime;
    f.has_identity = dev != 0 || ino != 0;
    job.files.push_back(f);
  }
  for (const auto& [path, mode, header, file_size, sidecar, sidecar_template, tensors] : shards) {
    tli::ShardTask s;
    s.path = path;
    s.mode = static_cast<tli::ShardMode>(mode);
    s.header = header;
    s.file_size = file_size;
    s.sidecar_path = sidecar;
    s.sidecar_template = sidecar_template;
    for (const auto& [name, offset, nbytes, dtype, op, factor, value, seed, bound, pre_round, sources, grid] :
         tensors) {
      tli::TensorTask t;
      t.name = name;
      t.out_offset = offset;
      t.nbytes = nbytes;
      t.dtype = static_cast<tli::DType>(dtype);
      t.op = static_cast<tli::OpKind>(op);
      t.factor = factor;
      t.value = value;
      t.seed = seed;
      t.bound = bound;
      t.has_pre_round = pre_round >= 0;
      if (t.has_pre_round) t.pre_round = static_cast<tli::DType>(pre_round);
      for (const auto& [file, src_offset, src_dtype] : sources)
        t.sources.push_back({file, src_offset, static_cast<tli::DType>(src_dtype)});
      std::tie(t.cols, t.block_rows, t.block_cols) = grid;
      s.tensors.push_back(std::move(t));
    }
    job.shards.push_back(std::move(s));
  }
  job.options.threads = threads;
  job.options.buffer_bytes = buffer_bytes;
  job.options.copy_chunk = copy_chunk;
  job.options.copy_file_range = copy_file_range;
  job.options.sparse = sparse;
  job.options.writeback = writeback;
  job.options.fsync = fsync;
  job.options.checksum = static_cast<tli::ChecksumMode>(checksum);
  job.options.test_chunk_delay_us = test_chunk_delay_us;
  job.options.drop_written = drop_written;
  job.options.drop_lag = drop_lag;
  job.options.check_finite = check_finite;
  job.options.out_dir_fd = dup_fd(out_dir_fd);
  try {
    job.options.sidecar_dir_fd = dup_fd(sidecar_dir_fd);
  } catch (...) {
    if (job.options.out_dir_fd >= 0) ::close(job.options.out_dir_fd);
    throw;
  }
  return std::make_unique<tli::Engine>(std::move(job));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "tli streaming conversion engine (C++ core in csrc/); use tli_kernels.checkpoint.executor_native";

  py::class_<tli::Engine>(m, "Engine")
      .def(py::init(&make_engine), py::arg("files"), py::arg("shards"), py::arg("threads"), py::arg("buffer_bytes"),
           py::arg("copy_chunk"), py::arg("copy_file_range"), py::arg("sparse"), py::arg("writeback"),
           py::arg("fsync"), py::arg("checksum") = 1, py::arg("test_chunk_delay_us") = 0,
           py::arg("drop_written") = true, py::arg("drop_lag") = 256 << 20, py::arg("out_dir_fd") = -1,
           py::arg("sidecar_dir_fd") = -1, py::arg("check_finite") = true)
      .def("start", &tli::Engine::start, py::call_guard<py::gil_scoped_release>())
      .def("wait", &tli::Engine::wait, py::arg("timeout"), py::call_guard<py::gil_scoped_release>())
      .def("cancel", &tli::Engine::cancel)
      .def_property_readonly("bytes_done", &tli::Engine::bytes_done)
      .def_property_readonly("cancelled", &tli::Engine::cancelled)
      .def("failure",
           [](const tli::Engine& e) -> py::object {
             if (!e.failed()) return py::none();
             const tli::Failure f = e.failure();
             return py::make_tuple(f.message, f.path, f.tensor, f.err, f.kind);
           })
      .def("finished", [](const tli::Engine& e) {
        py::list out;
        for (const auto& [shard, sum] : e.finished()) out.append(py::make_tuple(shard, sum.a, sum.b));
        return out;
      });

  m.def(
      "checksum_file",
      [](const std::string& path, uint64_t buffer_bytes) {
        py::gil_scoped_release release;
        try {
          const tli::Checksum c = tli::checksum_file(path, buffer_bytes);
          return std::make_pair(c.a, c.b);
        } catch (const tli::Failure& f) {
          throw std::runtime_error(f.path + ": " + f.message);
        }
      },
      py::arg("path"), py::arg("buffer_bytes") = 8 << 20);

  m.def(
      "sample_ranges", [](uint64_t size, uint64_t header_len) { return tli::sample_ranges(size, header_len); },
      py::arg("size"), py::arg("header_len"), "The sampled checksum's ranges, as csrc computes them (for tests).");
}
