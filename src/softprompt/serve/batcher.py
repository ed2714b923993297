"""Dynamic batching: requests for any prompt queue together and run as one mixed batch, off the event loop.

A single worker thread takes the first waiting job, then keeps collecting until `max_batch` items are queued or
`max_wait_ms` has passed since that first job, runs them in one forward pass, and resolves every job's future.
A batch that fails is split in halves and run again, down to single jobs, so only the job that caused the failure
gets the error: one bad request never fails the requests that happened to share its batch.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """More inputs are waiting than the batcher takes: the client should come back later (HTTP 503)."""


@dataclass
class Job:
    items: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """`group_key` (optional) limits a batch to jobs with the same key: with the prompt name as key this is the
    one-prompt-at-a-time baseline that single-adapter servers are limited to."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 32, max_wait_ms: float = 5.0,
                 on_batch: Callable[[int, list[float], float], None] | None = None,
                 group_key: Callable[[Job], Hashable] | None = None, max_queued: int | None = None):
        self.run = run
        self.max_queued = max_queued  # inputs waiting at most; past it `submit` raises QueueFull
        self.queued = 0  # inputs submitted and not yet taken into a batch
        self.queued_lock = threading.Lock()
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.on_batch = on_batch  # (batch size, queue waits, model seconds) for metrics
        self.group_key = group_key
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending: deque[Job] = deque()  # taken off the queue, waiting for a batch they fit
        self.closing = False
        self.worker = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
        self.worker.start()

    async def submit(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        job = Job(items, loop.create_future(), loop)
        with self.queued_lock:
            if self.max_queued is not None and self.queued + len(items) > self.max_queued:
                raise QueueFull(f"{self.queued} inputs are waiting (the limit is {self.max_queued}); retry shortly")
            self.queued += len(items)
        self.jobs.put(job)
        return await job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def _next(self, timeout: float | None) -> Job | None:
        """The next job off the queue; None on timeout or when closing."""
        if self.closing:
            return None
        try:
            job = self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None
        if job is None:
            self.closing = True
        return job

    def _work(self) -> None:
        while True:
            first = self.pending.popleft() if self.pending else self._next(None)
            if first is None:
                if self.closing and not self.pending:
                    return
                continue
            key = self.group_key(first) if self.group_key else None
            batch, size = [first], len(first.items)

            for job in list(self.pending):
                if self._fits(job, size, key):
                    self.pending.remove(job)
                    batch.append(job)
                    size += len(job.items)
            deadline = first.queued_at + self.max_wait
            while size < self.max_batch:
                job = self._next(max(0.0, deadline - time.perf_counter()))
                if job is None:
                    break
                if self._fits(job, size, key):
                    batch.append(job)
                    size += len(job.items)
                else:
                    self.pending.append(job)
            self._run(batch, size)

    def _fits(self, job: Job, size: int, key: Hashable) -> bool:
        return size + len(job.items) <= self.max_batch and (self.group_key is None or self.group_key(job) == key)

    def _run(self, batch: list[Job], size: int) -> None:
        with self.queued_lock:
            self.queued -= size
        started = time.perf_counter()
        waits = [started - job.queued_at for job in batch]
        try:
            self._run_isolated(batch)
        finally:
            if self.on_batch:
                self.on_batch(size, waits, time.perf_counter() - started)

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run `batch` as one; if it fails, run each half again, so that the error reaches only the jobs that
        fail on their own (the worker lives on either way)."""
        try:
            results = self.run([item for job in batch for item in job.items])
        except Exception as error:
            if len(batch) == 1:
                batch[0].loop.call_soon_threadsafe(_set_exception, batch[0].future, error)
                return
            middle = len(batch) // 2
            self._run_isolated(batch[:middle])
            self._run_isolated(batch[middle:])
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
