"""The output folder as a directory handle: every file tli writes is created inside it, by name,
without following a symbolic link.

DST is opened once (the path the user named may itself be a link to a folder: that is where they
asked the output to go). From then on every write goes through this handle with `*at` calls
relative to its fd:

- files are created with O_CREAT | O_EXCL | O_NOFOLLOW after any old entry of that name is
  unlinked (unlink removes a link itself, never its target), so a planted symlink or a hard link
  to someone else's file (a source shard, say) is never opened for writing or truncated;
- renames (`renameat`) replace a directory entry, never what a link points to;
- subfolders (.tli-shards) are opened with O_NOFOLLOW | O_DIRECTORY; a link there is an error;
- names are single path components: no '/', no '..'.

The native engine gets the same guarantees from the dup'd fds of this handle (csrc/engine.cpp
uses openat / renameat / unlinkat on them).

One writer per folder: `lock()` takes a `flock` on DST itself (no lock file is left behind; the
kernel drops the lock when the process ends, however it ends, so a crash leaves no stale lock).
A whole run takes it exclusively; `--part` runs share it and each also locks its own shards
(`lock_shards`: one byte per shard of `.tli-shards/parts.lock`, open-file-description locks), so
parts of one job run side by side while a second run of the same shards is refused. A refused
writer is told who holds the lock (its pid and command line from /proc, where visible).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat as stat_mod
import struct
import sys

from tli_kernels.checkpoint.errors import CheckpointError
from tli_kernels.checkpoint.validate import open_regular

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not a file name inside the output folder")


class OutputDir:
    """An open output folder (see the module docstring). Close it, or use it as a context manager."""

    def __init__(self, path: str, *, create: bool = False, _fd: int | None = None):
        self.path = os.path.abspath(path)
        if _fd is not None:
            self.fd = _fd
            return
        made = False
        if create:
            try:
                os.mkdir(self.path, 0o755)
                made = True
            except FileExistsError:
                pass
            except OSError as e:
                raise OSError(e.errno, f"cannot create the output folder: {e.strerror}", self.path) from None
        try:
            # A folder this call made must still be that folder, not a link swapped in since.
            self.fd = os.open(self.path, _O_DIR | (os.O_NOFOLLOW if made else 0))
        except OSError as e:
            raise OSError(e.errno, f"cannot open the output folder: {e.strerror}", self.path) from None

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def join(self, name: str) -> str:
        """The path of `name` in this folder, for messages (and for readers that then use this handle)."""
        return os.path.join(self.path, name)

    def dup(self) -> int:
        return os.dup(self.fd)

    # ---- subfolders --------------------------------------------------------------------------------
    def subdir(self, name: str, *, create: bool = True) -> OutputDir:
        _check_name(name)
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=self.fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise OSError(e.errno, f"cannot create folder: {e.strerror}", self.join(name)) from None
        try:
            fd = os.open(name, _O_DIR | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CheckpointError(
                    "is not a folder (a symbolic link or a file where tli keeps its own folder); "
                    "tli does not write through links: remove it",
                    self.join(name),
                ) from None
            raise OSError(e.errno, f"cannot open folder: {e.strerror}", self.join(name)) from None
        return OutputDir(self.join(name), _fd=fd)

    def rmtree(self, name: str) -> None:
        """Remove a subfolder and everything in it; links inside are removed, never followed."""
        _check_name(name)
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        try:
            if not stat_mod.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=self.fd)
                return
            shutil.rmtree(name, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except OSError as e:  # shutil names the entry relative to the fd: name the whole path
            raise OSError(e.errno, f"cannot remove: {e.strerror}", self.join(name)) from None

    def clear(self) -> None:
        """Remove everything inside this folder (never through a link), keeping the folder itself:
        its lock (lock()) stays held, so --overwrite cannot open a window for a second writer."""
        for name in self.listdir():
            self.rmtree(name)

    # ---- one writer per folder -------------------------------------------------------------------
    def lock(self, *, shared: bool = False) -> None:
        """Hold a flock on this folder until close(): exclusive for a whole run, shared for --part runs.
        Raises CheckpointError naming the holder when another writer has it."""
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"is being written by {lock_holder(self.fd)}; one writer per output folder: wait for it to end "
                "(or stop it), or choose another output folder",
                self.path,
            ) from None
        except OSError as e:  # a file system without flock on folders (some network mounts)
            _warn_unlocked(self.path, e)

    def lock_shards(self, shards: list[int], names: list[str]) -> int:
        """Lock byte i of .tli-shards/parts.lock for each shard i (a --part run's shards); returns the
        fd, which holds the locks until closed. CheckpointError naming a shard another run holds."""
        side = self.subdir(".tli-shards")
        try:
            fd = os.open("parts.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=side.fd)
        finally:
            side.close()
        try:
            for i, name in zip(shards, names):
                try:
                    fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, i, 1, 0))
                except (BlockingIOError, PermissionError):
                    raise CheckpointError(
                        f"shard {name} is being written by another --part run ({lock_holder(self.fd)}); "
                        "each part of a job must run once at a time",
                        self.path,
                    ) from None
                except OSError as e:
                    _warn_unlocked(self.path, e)
                    break
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- entries -----------------------------------------------------------------------------------
    def lstat(self, name: str) -> os.stat_result | None:
        _check_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def is_regular(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and stat_mod.S_ISREG(st.st_mode)

    def holds(self, name: str, fd: int) -> bool:
        """The entry `name` is still the file open as fd (nothing replaced it since this run created it)."""
        st = self.lstat(name)
        mine = os.fstat(fd)
        return st is not None and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def unlink(self, name: str) -> bool:
        """Remove the entry `name` (a link itself, not its target); False when there was none."""
        _check_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False
        except (IsADirectoryError, PermissionError) as e:
            if self.lstat(name) is not None and stat_mod.S_ISDIR(self.lstat(name).st_mode):
                raise CheckpointError("is a folder where tli writes a file; remove it", self.join(name)) from None
            raise OSError(e.errno, f"cannot remove: {e.strerror}", self.join(name)) from None
        except OSError as e:
            raise OSError(e.errno, f"cannot remove: {e.strerror}", self.join(name)) from None

    def create(self, name: str, mode: int = 0o644, flags: int = os.O_WRONLY) -> int:
        """A new empty file `name` (whatever had that name is unlinked first), never through a link."""
        _check_name(name)
        self.unlink(name)
        try:
            return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot create: {e.strerror}", self.join(name)) from None

    def open_read(self, name: str) -> int:
        """Read-only fd of a regular file `name` of this folder; a link or a special file raises."""
        _check_name(name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointError("is a symbolic link; tli trusts only files it wrote", self.join(name)) from None
            raise
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError("is not a regular file", self.join(name))
        return fd

    def read_bytes(self, name: str, limit: int = 64 << 20) -> bytes:
        fd = self.open_read(name)
        try:
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise CheckpointError(f"is larger than {limit} bytes", self.join(name))
        return data

    def rename(self, old: str, new: str) -> None:
        _check_name(old)
        _check_name(new)
        try:
            os.replace(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            raise OSError(e.errno, f"cannot rename {old} into place: {e.strerror}", self.join(new)) from None

    def fsync(self) -> None:
        os.fsync(self.fd)

    # ---- whole files, atomically ---------------------------------------------------------------------
    def _tmp_name(self, name: str) -> str:
        return f"{name}.tmp-{os.getpid()}"

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write `name` as a new file: a temporary name, fsync, rename. Errors name `name`."""
        tmp = self._tmp_name(name)
        fd = self.create(tmp)
        try:
            _write_all(fd, data, self.join(name))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(tmp)
            raise
        os.close(fd)
        self.rename(tmp, name)

    def write_json_atomic(self, name: str, obj: object) -> None:
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        self.write_atomic(name, text.encode("utf-8"))

    def copy_in(self, name: str, src_path: str, expect_sha256: str | None = None) -> None:
        """Copy the regular file src_path to `name` atomically; with expect_sha256, the bytes copied
        must hash to it (the source file changed since it was planned otherwise)."""
        tmp = self._tmp_name(name)
        src = open_regular(src_path, name)
        try:
            fd = self.create(tmp)
            try:
                digest = hashlib.sha256()
                while block := os.read(src, 1 << 20):
                    digest.update(block)
                    _write_all(fd, block, self.join(name))
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.unlink(tmp)
                raise
            os.close(fd)
        finally:
            os.close(src)
        if expect_sha256 is not None and digest.hexdigest() != expect_sha256:
            self.unlink(tmp)
            raise CheckpointError("source file changed since the run was planned; the output is not finished", src_path)
        self.rename(tmp, name)


_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)  # Linux >= 3.15
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid
_warned_unlocked: set[str] = set()


def _warn_unlocked(path: str, e: OSError) -> None:
    if path not in _warned_unlocked:
        _warned_unlocked.add(path)
        print(
            f"tli: warning: {path}: cannot lock the output folder ({e.strerror or e}); "
            "make sure no other tli run writes it at the same time",
            file=sys.stderr,
        )


def lock_holder(fd: int) -> str:
    """'process PID: COMMAND' holding a flock on fd's file (for a shared lock, another holder than this
    process where there is one), from /proc/locks; else a vaguer phrase (a holder on another machine)."""
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if "->" in fields:  # a waiter, not a holder
                    continue
                if len(fields) < 6 or fields[1] != "FLOCK":
                    continue
                try:
                    major, minor, ino = fields[5].split(":")
                    key = (int(major, 16), int(minor, 16), int(ino))
                    pid = int(fields[4])
                except ValueError:
                    continue
                if key == want and pid > 0:
                    pids.append(pid)
    except OSError:
        pass
    others = [p for p in pids if p != os.getpid()] or pids
    if others:
        return f"process {others[0]}{_command(others[0])}"
    return "another process (perhaps on another machine)"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return ""
    text = " ".join(argv)
    return f": {text[:200]}" if text else ""


def _write_all(fd: int, data: bytes, path: str) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as e:
            raise OSError(e.errno, f"cannot write: {e.strerror}", path) from None
        view = view[n:]
