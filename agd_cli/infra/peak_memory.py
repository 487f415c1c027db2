"""Peak memory of a block of work, the one measure `agd bench` and the training probe share.

CUDA: `torch.cuda.max_memory_allocated` over the block. CPU: the peak resident set size
(Linux: VmHWM after resetting it through /proc/self/clear_refs; elsewhere psutil's peak
working set (Windows) or current RSS).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import psutil  # portable: /proc does not exist on Windows
import torch


class PeakMemory:
    """Peak memory of a block of work: the one measure of `agd bench` and this probe.

    CUDA: torch.cuda.max_memory_allocated, reset on entry (tensors only, exact).
    CPU: the process's resident set size. poll=True samples it every 2 ms from a thread, for
    the peak of one block among others in a process (bench's methods). Otherwise the kernel's
    high-water mark VmHWM, reset on entry through /proc/self/clear_refs (Linux; elsewhere
    psutil's peak working set on Windows, else the RSS at exit). `start` is the memory at
    entry, `increase` the peak minus it, `method` says how the peak was measured.
    """

    def __init__(self, device, poll: bool = False):
        self.device, self.poll = device, poll
        self.peak = self.start = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.poll:
            self.method = "peak RSS (sampled every 2 ms)"
            self.start = self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.method = _reset_high_water_mark()
            self.start = _rss()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        else:  # the kernel's RSS counters lag by a few pages per thread: a block's peak is at
            # least where it started
            self.peak = max(self.start, _proc_status("VmHWM") or _psutil_memory()[1])

    @property
    def increase(self) -> int:
        return max(0, self.peak - self.start)


def _reset_high_water_mark() -> str:
    """Reset the process's peak RSS where the OS allows it; returns how the peak is measured."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return "peak RSS (VmHWM, reset before the first step)"
    except OSError:
        return "peak RSS (psutil: peak working set on Windows, else the RSS after the step)"


def _rss() -> int:
    """The process's resident set size now (0 where it cannot be read)."""
    return _proc_status("VmRSS") or _psutil_memory()[0]


def _psutil_memory() -> tuple[int, int]:
    """(current, peak) resident memory where /proc is missing; peak is Windows' peak working set."""
    try:
        info = psutil.Process().memory_info()
    except psutil.Error:
        return 0, 0
    return info.rss, getattr(info, "peak_wset", info.rss)


def _proc_status(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


# --- inside the measuring process ------------------------------------------------------------
