"""The one harness every benchmark in this folder uses.

Timing a call (`time_fn`, the "eager call" time): warm-up calls first, then `reps` timed calls, median
reported (with the 20th and 80th percentiles and the minimum). On CUDA each call is bracketed by its own
pair of CUDA events after a sync, so the time includes the Python and dispatch work of launching it
(for a kernel of a few microseconds that is most of it); on CPU it is perf_counter. `device_time` is the
kernel-only column: the GPU time of the kernels the call launched, from torch.profiler (CUPTI), summed
per call, with no launch gaps. Inputs rotate: given several argument sets, call i gets set i mod n, so a
kernel whose inputs would fit in L2 is not timed reading its own cached output (`rotation_sets` picks n
from the device's L2 size).

Timing a process (`run_process`): wall clock, CPU time and peak RSS of a whole process tree, from GNU
time when installed, else from a minimal Python waiter's os.wait4 (its RSS floor recorded).

Recording (`Results`): one JSON document per run, rewritten (atomically) after every section so a run
that is cut off keeps what it had; a failing section records its error and the run goes on. Every
document carries `environment()`: date, git commit, machine, accelerator and library versions.
Tables are markdown (`markdown_table`), with the baseline named and ratios taken within the same run.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Distributions whose versions go with every result (None when not installed).
VERSIONED = ("torch", "triton", "transformers", "safetensors", "numpy", "flash-attn", "liger-kernel")


# ------------------------------------------------------------------------------------ timing a call
def time_fn(
    fn: Callable[..., object],
    *,
    device=None,
    warmup: int = 5,
    reps: int = 20,
    setup: Callable[..., object] | None = None,
    inputs: Sequence[Sequence] | None = None,
) -> dict:
    """Milliseconds per call of `fn`: median, p20, p80, min, reps, and the number of rotated input sets.

    inputs: argument tuples; call i runs `setup(*inputs[i % n])` (untimed) then `fn(*inputs[i % n])`.
    Without inputs, fn and setup take no arguments.
    """
    sets = list(inputs) if inputs else [()]
    cuda = device is not None and getattr(device, "type", str(device)) == "cuda"
    if cuda:
        import torch

    def args(i: int) -> Sequence:
        return sets[i % len(sets)]

    for i in range(warmup):
        if setup is not None:
            setup(*args(i))
        fn(*args(i))
    samples = []
    if cuda:
        torch.cuda.synchronize(device)
        for i in range(reps):
            if setup is not None:
                setup(*args(warmup + i))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args(warmup + i))
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for i in range(reps):
            if setup is not None:
                setup(*args(warmup + i))
            started = time.perf_counter()
            fn(*args(warmup + i))
            samples.append((time.perf_counter() - started) * 1e3)
    return summarize_ms(samples) | {"input_sets": len(sets)}


def device_time(
    fn: Callable[..., object],
    *,
    device=None,
    warmup: int = 3,
    reps: int = 20,
    setup: Callable[..., object] | None = None,
    inputs: Sequence[Sequence] | None = None,
) -> dict | None:
    """Kernel-only milliseconds per call: the GPU time of every kernel (and memcpy/memset) `fn` launches,
    from torch.profiler, divided by reps. None off CUDA. Rotates inputs like `time_fn`; `setup` runs
    inside the profiled region, so it must launch no GPU work (clearing .grad to None does not)."""
    if device is None or getattr(device, "type", str(device)) != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    sets = list(inputs) if inputs else [()]
    for i in range(warmup):
        if setup is not None:
            setup(*sets[i % len(sets)])
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            args = sets[(warmup + i) % len(sets)]
            if setup is not None:
                setup(*args)
            fn(*args)
        torch.cuda.synchronize(device)
    return device_ms_per_call(prof.events(), reps)


def device_ms_per_call(events, reps: int) -> dict:
    """Sum the device-side durations of profiler events (kernels, memcpy, memset) over `reps` calls."""
    total_us, kernels = 0.0, 0
    for event in events:
        if not str(getattr(event, "device_type", "")).endswith("CUDA"):
            continue  # a CPU-side event (the launch call), not GPU time
        total_us += event.time_range.elapsed_us()
        kernels += 1
    if not reps:
        raise ValueError("device_ms_per_call: reps must be >= 1")
    return {"kernel_ms": total_us / reps / 1e3, "kernels_per_call": kernels / reps, "reps": reps,
            "method": "torch.profiler device time (CUPTI), kernels + memcpy/memset, summed per call"}  # fmt: skip


def summarize_ms(samples: Sequence[float]) -> dict:
    """median / p20 / p80 / min of a list of milliseconds."""
    if not samples:
        raise ValueError("no samples to summarize (reps must be >= 1)")
    s = sorted(samples)
    return {
        "median_ms": statistics.median(s),
        "p20_ms": s[int(0.2 * (len(s) - 1))],
        "p80_ms": s[int(0.8 * (len(s) - 1))],
        "min_ms": s[0],
        "reps": len(s),
    }


def cache_bytes(device=None) -> int:
    """The last-level cache a rotation must overflow: the GPU's L2 on CUDA, else the CPU's largest cache."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 << 20)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 << 20)


def rotation_sets(bytes_per_set: int, device=None, *, minimum: int = 2, maximum: int = 8) -> int:
    """How many input sets to cycle so that together they are at least 3x the last-level cache."""
    needed = math.ceil(3 * cache_bytes(device) / max(1, bytes_per_set))
    return max(minimum, min(maximum, needed))


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Bytes allocated at the peak of one call of `fn`, above what was allocated before (CUDA only)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


def refuse_interpreter_on_cuda(device) -> None:
    """A GPU benchmark must time the compiled kernels: with TRITON_INTERPRET=1 Triton would build every
    kernel for its CPU interpreter and run it there on CUDA tensors (tli_kernels refuses those calls)."""
    if getattr(device, "type", str(device)) == "cuda" and interpreter_requested():
        raise SystemExit(
            f"refusing to benchmark on CUDA with TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}: the Triton "
            "kernels would run in the CPU interpreter; unset TRITON_INTERPRET"
        )


@contextlib.contextmanager
def fp32_matmul_precision(precision: str) -> Iterator[None]:
    """Float32 CUDA matmuls as "ieee" (true float32) or "tf32", restored on exit: `fp32_precision` where
    torch has it (2.9+, where `allow_tf32` is deprecated), else `allow_tf32`."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = precision
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # pragma: no cover - torch < 2.9
        previous = matmul.allow_tf32
        matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def matmul_precision_flags() -> dict:
    """The float32 matmul setting in force, for the record."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return {"cuda_matmul_fp32_precision": matmul.fp32_precision}
    return {"cuda_matmul_allow_tf32": matmul.allow_tf32}  # pragma: no cover - torch < 2.9


# --------------------------------------------------------------------------------- timing a process
GNU_TIME = "/usr/bin/time"

# Without GNU time: a minimal Python (-S, no site) forks the command, waits for it with os.wait4 and
# writes its own RSS before the fork (the floor every child inherits) and the child's rusage.
_WAITER = """
import os, sys
with open("/proc/self/status") as f:
    floor = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write("%f %f %d %d" % (ru.ru_utime, ru.ru_stime, ru.ru_maxrss, floor))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_process(cmd: str, *, timeout: float = 7200, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run `cmd` under bash: wall seconds, CPU seconds and peak RSS in MiB of the largest process of the
    tree (bash waits for its children, so their rusage is folded into its own).

    A process's peak RSS counts what it held before exec, and a child forked from this (large) Python
    process would start with its RSS. So the command is started by a small process that reports its
    child's rusage: GNU time (`/usr/bin/time`, ~2 MiB: `cp` reads as cp's own ~2 MiB) when installed,
    else a minimal Python waiter (~10 MiB), whose own RSS is recorded as `rss_floor_mib` (at most what
    a child inherits: peaks near it mean "this small or smaller"). Raises RuntimeError with the tail of
    stderr when the command fails or runs past `timeout`."""
    load = os.getloadavg()[0]
    gnu_time = os.access(GNU_TIME, os.X_OK)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as usage:
        if gnu_time:
            argv = [GNU_TIME, "-f", "%U %S %M", "-o", usage.name, "bash", "-c", cmd]
        else:
            argv = [sys.executable, "-S", "-c", _WAITER, usage.name, "bash", "-c", cmd]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s: {cmd}") from None
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"exit status {proc.returncode}: {cmd}\n{tail}")
        fields = usage.read().split()
    result = {"wall_s": round(wall, 3), "load_before": round(load, 2)}
    if gnu_time:
        user, system, max_kib = fields[-3:]
        result.update(rusage="GNU time")
    else:
        user, system, max_kib, floor_kib = fields
        result.update(rusage="python waiter", rss_floor_mib=round(int(floor_kib) / 1024, 1))
    result.update(cpu_s=round(float(user) + float(system), 3), peak_rss_mib=round(int(max_kib) / 1024, 1))
    return result


# -------------------------------------------------------------------------------------- environment
def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _head_from_files() -> str | None:
    """HEAD's commit read from .git without the git program (a copied checkout on a bare machine)."""
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = REPO / ".git" / ref
            if path.is_file():
                return path.read_text().strip()[:12]
            for line in (REPO / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
            return None
        return head[:12]
    except OSError:
        return None


def git_state() -> dict:
    """The commit the code came from (TLI_GIT_COMMIT overrides, for copies without .git), and whether the
    tracked files differ from it (None when unknown)."""
    commit = os.environ.get("TLI_GIT_COMMIT") or _git("rev-parse", "--short=12", "HEAD") or _head_from_files()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def process_age_s() -> float:
    """Seconds since this process started (imports included), from /proc; 0 where unknown."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    try:
        import tli_kernels

        out["tli_kernels"] = tli_kernels.__version__
    except Exception:  # run from a checkout that cannot import: say so rather than fail the benchmark
        out["tli_kernels"] = None
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def accelerator() -> dict | None:
    """The CUDA device, or None; queried only when torch is already imported (no CUDA init otherwise)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }


def environment(**extra) -> dict:
    """Date, git state, machine, accelerator and versions: recorded with every result."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "git": git_state(),
        "machine": {
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "cpus_usable": usable,
            "memory_gib": _memory_gib(),
            "os": f"{platform.system()} {platform.release()}",
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "accelerator": accelerator(),
        "versions": versions(),
    }
    env.update(extra)
    return env


def describe_environment(env: dict) -> str:
    """One paragraph naming when, where and with what a result was measured."""
    m, v, git = env["machine"], env["versions"], env.get("git") or {}
    acc = env.get("accelerator")
    device = f"{acc['name']} (sm {acc['capability']}, {acc['memory_gib']} GiB, CUDA {acc['cuda']})" if acc else "no GPU"
    names = ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
    commit = git.get("commit") or "unknown"
    if git.get("dirty"):
        commit += " + uncommitted changes"
    return (
        f"Measured {env['date_utc']} UTC at commit {commit}. Machine: {m['cpu']}, {m['cpus']} CPUs "
        f"({m['cpus_usable']} usable), {m['memory_gib']} GiB RAM, {m['os']}, load average "
        f"{m['load_average'][0]:.1f} at the start; {device}. Versions: {names}."
    )


# ---------------------------------------------------------------------------------------- recording
class Results:
    """A JSON document rewritten after every section. Keys may be nested paths ("layer/8b/4096")."""

    def __init__(self, path: str | os.PathLike, *, since_process_start: bool = False, **meta):
        """since_process_start: `elapsed()` counts from the process's start (imports included)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter() - (process_age_s() if since_process_start else 0.0)
        self.data: dict = {"environment": environment(), **meta}
        self.save()

    def get(self, key: str, default=None):
        node = self.data
        for part in key.split("/"):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def put(self, key: str, value) -> None:
        *parents, last = key.split("/")
        node = self.data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    def section(self, key: str, fn: Callable[..., object], *args, **kwargs):
        """Run fn; store its result (or its error and traceback) under key, with its seconds; save."""
        started = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
        try:
            value = fn(*args, **kwargs)
        except Exception as error:  # recorded, not hidden: the JSON says which section failed and why
            value = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            print(f"    {key} failed: {value['error']}", flush=True)
        self.put(key, value)
        self.data.setdefault("section_seconds", {})[key] = round(time.perf_counter() - started, 2)
        self.save()
        return value

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------- markdown
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; None cells print as empty."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the table {len(headers)}: {row}")
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def fmt_ratio(x: float | None) -> str:
    """1.23x; small ratios keep two significant digits (0.0047x) rather than reading 0.00x."""
    if x is not None and 0 < abs(x) < 0.1:
        return f"{x:.2g}x"
    return fmt(x, ".2f", "x")
