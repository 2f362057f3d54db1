"""Timing and peak-memory helpers shared by the benchmark scripts."""
from __future__ import annotations

import os
import statistics
import threading
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak extra memory while a block runs: CUDA allocator peak, or process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base, self.top, self.running = self._rss(), self._rss(), True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.top = max(self.top, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, self._rss()) - self.base
        return False


def timed(fn, device, reps=1):
    """(median seconds, peak extra bytes, last result) over `reps` runs."""
    times, peaks, out = [], [], None
    for _ in range(reps):
        with PeakMemory(device) as mem:
            sync(device)
            start = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
    return statistics.median(times), max(peaks), out


def gib(n):
    return f"{n / 2**30:.2f} GiB"
