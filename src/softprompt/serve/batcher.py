"""Dynamic batching: requests for any prompt queue together and run as one mixed batch, off the event loop.

A single worker thread takes the first waiting job, then keeps collecting until `max_batch` items are queued or
`max_wait_ms` has passed since that first job, runs them in one forward pass, and resolves every job's future.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Job:
    items: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, run: Callable[[list], list], max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, list[float]], None] | None = None):
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch  # (batch size, queue waits in seconds) for metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
        self.worker.start()

    async def submit(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        job = Job(items, loop.create_future(), loop)
        self.jobs.put(job)
        return await job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _work(self) -> None:
        carried: Job | None = None
        while True:
            first = carried or self.jobs.get()
            carried = None
            if first is None:
                return
            batch, size = [first], len(first.items)
            deadline = first.queued_at + self.max_wait
            while size < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                if size + len(job.items) > self.max_batch:
                    carried = job  # starts the next batch
                    break
                batch.append(job)
                size += len(job.items)
            self._run(batch, size)

    def _run(self, batch: list[Job], size: int) -> None:
        started = time.perf_counter()
        if self.on_batch:
            self.on_batch(size, [started - job.queued_at for job in batch])
        try:
            results = self.run([item for job in batch for item in job.items])
        except Exception as error:  # every waiting request gets the error, the worker lives on
            for job in batch:
                job.loop.call_soon_threadsafe(_set_exception, job.future, error)
            return
        offset = 0
        for job in batch:
            part = results[offset : offset + len(job.items)]
            offset += len(job.items)
            job.loop.call_soon_threadsafe(_set_result, job.future, part)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
