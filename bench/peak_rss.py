"""Peak resident memory of this process while a block runs, sampled every 2 ms (CPU benchmarks).

Take it before the first step of what is measured: memory freed inside the process stays in its RSS, so a start
after a warm-up step would hide that step's high-water mark.
"""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """`with PeakRSS() as peak: ...`, then `peak.mib`: the highest RSS above the start, in MiB."""

    def __enter__(self) -> PeakRSS:
        self._process = psutil.Process()
        self._start = self._peak = self._process.memory_info().rss
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self._peak - self._start) / 2**20
