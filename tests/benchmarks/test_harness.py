"""benchmarks/harness.py: timing with rotated inputs, process rusage, partial results, tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import harness  # noqa: E402


def test_time_fn_rotates_input_sets_and_runs_setup_untimed():
    calls, setups = [], []
    result = harness.time_fn(
        lambda i: calls.append(i), setup=lambda i: setups.append(i), inputs=[(0,), (1,), (2,)], warmup=1, reps=4
    )
    assert calls == [0, 1, 2, 0, 1] and setups == calls  # warm-up on set 0, then sets 1, 2, 0, 1
    assert result["reps"] == 4 and result["input_sets"] == 3
    assert result["min_ms"] <= result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]


def test_time_fn_without_inputs_calls_with_no_arguments():
    count = []
    assert harness.time_fn(lambda: count.append(1), warmup=2, reps=3)["input_sets"] == 1
    assert len(count) == 5


def test_summarize_ms():
    s = harness.summarize_ms([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_ms"], s["min_ms"], s["reps"]) == (3.0, 1.0, 5)
    with pytest.raises(ValueError, match="no samples"):
        harness.summarize_ms([])


def test_rotation_sets_overflow_the_cache_within_bounds():
    cache = harness.cache_bytes()
    assert cache > 0
    assert harness.rotation_sets(10 * cache) == 2  # large sets: the minimum
    assert harness.rotation_sets(1) == 8  # tiny sets: the maximum
    assert harness.rotation_sets(cache, maximum=16) == 3


TOUCH_200MIB = f"{sys.executable} -c \"b = bytearray(b'x' * (200 << 20))\""  # 200 MiB actually touched


@pytest.mark.parametrize("gnu_time", [True, False], ids=["gnu-time", "python-waiter"])
def test_run_process_reports_wall_cpu_and_peak_rss(monkeypatch, gnu_time):
    if not gnu_time:
        monkeypatch.setattr(harness, "GNU_TIME", "/nonexistent/time")
    elif not harness.os.access(harness.GNU_TIME, harness.os.X_OK):
        pytest.skip("GNU time is not installed")
    big = harness.run_process(TOUCH_200MIB)
    assert big["peak_rss_mib"] >= 190 and big["cpu_s"] > 0 and big["wall_s"] > 0
    small = harness.run_process("true")  # not this (large) test process's RSS: the waiter is small
    assert small["peak_rss_mib"] < 40
    assert small["rusage"] == ("GNU time" if gnu_time else "python waiter")
    if not gnu_time:
        assert 0 < small["rss_floor_mib"] < 40


@pytest.mark.parametrize("gnu_time", [True, False], ids=["gnu-time", "python-waiter"])
def test_run_process_errors_name_the_command(monkeypatch, gnu_time):
    if not gnu_time:
        monkeypatch.setattr(harness, "GNU_TIME", "/nonexistent/time")
    with pytest.raises(RuntimeError, match=r"exit status 3: echo oops >&2; exit 3\noops"):
        harness.run_process("echo oops >&2; exit 3")
    with pytest.raises(RuntimeError, match="timed out"):
        harness.run_process("sleep 10", timeout=0.5)


def test_results_keep_every_finished_section_on_disk(tmp_path):
    path = tmp_path / "r.json"
    results = harness.Results(path, settings={"a": 1})
    saved = json.loads(path.read_text())
    assert saved["settings"] == {"a": 1} and saved["environment"]["date_utc"]
    assert results.section("models/x/ok", lambda: {"value": 2}) == {"value": 2}
    assert json.loads(path.read_text())["models"]["x"]["ok"] == {"value": 2}

    def boom():
        raise MemoryError("out of memory")

    failed = results.section("models/x/bad", boom)
    assert failed["error"] == "MemoryError: out of memory" and "traceback" in failed
    on_disk = json.loads(path.read_text())  # a run cut off now keeps both sections
    assert on_disk["models"]["x"]["ok"] == {"value": 2} and "error" in on_disk["models"]["x"]["bad"]
    assert set(on_disk["section_seconds"]) == {"models/x/ok", "models/x/bad"}
    assert results.get("models/x/ok/value") == 2 and results.get("models/y", "none") == "none"
    assert not (tmp_path / "r.json.tmp").exists()


def test_environment_names_commit_machine_and_versions():
    env = harness.environment(extra_field=1)
    assert env["extra_field"] == 1
    assert env["versions"]["torch"] and env["versions"]["python"]
    assert env["machine"]["cpus"] >= 1
    assert "commit" in env["git"]
    text = harness.describe_environment(env)
    assert env["date_utc"] in text and "torch" in text


def test_markdown_table_and_ratio_formatting():
    table = harness.markdown_table(["a", "b"], [[1, None], ["x", 2.5]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 |  |", "| x | 2.5 |"]
    with pytest.raises(ValueError, match="2 cells"):
        harness.markdown_table(["a"], [[1, 2]])
    assert harness.fmt_ratio(1.234) == "1.23x"
    assert harness.fmt_ratio(0.00471) == "0.0047x"
    assert harness.fmt_ratio(None) == "n/a"
    assert harness.ratio(1.0, 0) is None


def test_process_age_and_commit_without_git(monkeypatch):
    assert 0 <= harness.process_age_s() < 24 * 3600
    monkeypatch.setenv("TLI_GIT_COMMIT", "abc123")
    assert harness.git_state()["commit"] == "abc123"
    head = harness._head_from_files()  # .git read directly: what a bare machine without git gets
    if head is not None:
        monkeypatch.delenv("TLI_GIT_COMMIT")
        assert harness.git_state()["commit"].startswith(head[:7])


def test_kernel_only_time_sums_device_events_per_call():
    from types import SimpleNamespace as NS

    def event(device, start, end):
        return NS(device_type=f"DeviceType.{device}", time_range=NS(elapsed_us=lambda: end - start))

    # Two calls, each one CPU launch event (not GPU time) and two kernels of 3 + 5 us.
    events = [event("CPU", 0, 40), event("CUDA", 10, 13), event("CUDA", 13, 18)] * 2
    result = harness.device_ms_per_call(events, reps=2)
    assert result["kernel_ms"] == pytest.approx(0.008) and result["kernels_per_call"] == 2
    assert harness.device_time(lambda: None, device="cpu") is None  # no GPU: no kernel-only column


def test_gpu_benchmarks_refuse_the_interpreter_on_cuda(monkeypatch):
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="refusing to benchmark on CUDA with TRITON_INTERPRET=1"):
        harness.refuse_interpreter_on_cuda(torch.device("cuda"))
    harness.refuse_interpreter_on_cuda(torch.device("cpu"))  # the CPU smoke runs use the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    harness.refuse_interpreter_on_cuda(torch.device("cuda"))


def test_fp32_matmul_precision_is_set_and_restored():
    import torch

    with harness.fp32_matmul_precision("ieee"):
        assert harness.matmul_precision_flags() in ({"cuda_matmul_fp32_precision": "ieee"},
                                                    {"cuda_matmul_allow_tf32": False})  # fmt: skip
    before = harness.matmul_precision_flags()
    with harness.fp32_matmul_precision("tf32"):
        pass
    assert harness.matmul_precision_flags() == before
    assert torch.backends.cuda.matmul is not None
