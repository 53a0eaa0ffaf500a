"""Shared setup for the pytest-benchmark suite (``make bench``; see docs/benchmarks.md).

- collects ``bench_*.py`` when pytest is given the directory (pytest's default pattern is ``test_*.py``);
- ``machine``: a one-line description of the device, stored in every result's extra_info;
- ``copy_bandwidth``: measured device copy bandwidth in GB/s (read + write), the ceiling that
  bandwidth-bound kernels are reported against;
- ``bandwidth``: records a benchmark's context and its achieved GB/s (``describe`` then ``measured``);
- ``device_sync``: ``device_sync(device)()`` waits for queued device work, so a timed call measures it;
- at the end, a summary of each benchmark group relative to its ``eager`` row (or its first row), which
  is what docs/benchmarks.md records.
"""

from __future__ import annotations

import os
import platform
import time

import pytest
import torch


def pytest_configure(config):
    # On a shared, oversubscribed CPU, torch's intra-op thread pool turns each small op into a wait for a
    # second thread (tens of ms); FEWSTEP_BENCH_THREADS pins the count so results are comparable.
    threads = os.environ.get("FEWSTEP_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def describe_machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"load {load:.1f}, torch {torch.__version__}")


@pytest.fixture(scope="session")
def machine() -> str:
    return describe_machine()


def sync(device) -> callable:
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@pytest.fixture(scope="session")
def copy_bandwidth() -> dict:
    """GB/s of ``dst.copy_(src)`` (bytes read + written) on 256 MiB fp32 (CUDA) or 64 MiB (CPU), best of 20."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = (64 if device == "cuda" else 16) * 2**20
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    wait = sync(device)
    best = float("inf")
    for _ in range(20):
        dst.copy_(src)
        wait()
        t = time.perf_counter()
        dst.copy_(src)
        wait()
        best = min(best, time.perf_counter() - t)
    return {"device": device, "gbps": 2 * 4 * n / best / 1e9}


class Bandwidth:
    """Context and achieved bandwidth of one benchmark, stored in its extra_info (and so in the JSON)."""

    def __init__(self, benchmark, machine: str, copy_gbps: float):
        self.benchmark, self.copy_gbps = benchmark, copy_gbps
        benchmark.extra_info["machine"] = machine

    def describe(self, nbytes: int | None = None, **info):
        """Before ``benchmark(...)``: what runs; ``nbytes`` = compulsory bytes read + written per call."""
        self.benchmark.extra_info.update(info)
        if nbytes is not None:
            self.benchmark.extra_info["bytes"] = nbytes

    def measured(self):
        """After ``benchmark(...)``: GB/s at the median time, and as a fraction of device copy bandwidth."""
        info, meta = self.benchmark.extra_info, self.benchmark.stats
        if "bytes" not in info or not meta:
            return
        gbps = info["bytes"] / meta.stats.median / 1e9
        info.update(gbps=round(gbps, 2), copy_gbps=round(self.copy_gbps, 2),
                    fraction_of_copy=round(gbps / self.copy_gbps, 3))


@pytest.fixture
def bandwidth(benchmark, machine, copy_bandwidth) -> Bandwidth:
    return Bandwidth(benchmark, machine, copy_bandwidth["gbps"])


@pytest.fixture(scope="session")
def device_sync():
    """``device_sync(device)``: a callable that waits for queued work on that device (no-op on CPU)."""
    return sync


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Per group: each row's median and its speedup over the group's ``eager`` row (or the first row)."""
    session = getattr(config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)] if session else []
    if not benches:
        return
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b.group or "", []).append(b)
    tr = terminalreporter
    tr.section("fewstep benchmark ratios (median; speedup = baseline median / row median)")
    tr.write_line(f"machine: {describe_machine()}")
    for group, rows in groups.items():
        base = next((r for r in rows if r.extra_info.get("variant") == "eager"), rows[0])
        tr.write_line(f"[{group}]")
        for r in rows:
            med = r.stats.median
            gbps = r.extra_info.get("gbps")
            extra = f"  {gbps:8.2f} GB/s" if gbps is not None else ""
            tr.write_line(f"  {r.name:60s} {med * 1e6:12.1f} us  x{base.stats.median / med:6.2f}{extra}")
