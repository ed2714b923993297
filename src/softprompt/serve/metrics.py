"""Counters for GET /metrics in the Prometheus text format (no client library needed for this handful)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BatchCounters:
    """One batcher's counters; `prefix` names them (softprompt_batches_total, softprompt_generate_batches_total)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.batches = 0
        self.items = 0
        self.queue_wait_sum = 0.0
        self.queue_wait_count = 0
        self.seconds = 0.0  # time the model spent on batches: busy fraction = its rate over wall time

    def lines(self) -> list[str]:
        p = self.prefix
        return [
            f"# TYPE {p}batches_total counter",
            f"{p}batches_total {self.batches}",
            f"# TYPE {p}batch_items_total counter",
            f"{p}batch_items_total {self.items}",
            f"# TYPE {p}batch_seconds summary",
            f"{p}batch_seconds_sum {self.seconds:.6f}",
            f"{p}batch_seconds_count {self.batches}",
            f"# TYPE {p}queue_wait_seconds summary",
            f"{p}queue_wait_seconds_sum {self.queue_wait_sum:.6f}",
            f"{p}queue_wait_seconds_count {self.queue_wait_count}",
        ]


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency_buckets: dict[float, int] = defaultdict(int)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.batchers = {"classify": BatchCounters("softprompt_"), "generate": BatchCounters("softprompt_generate_")}

    def request(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for bound in LATENCY_BUCKETS:
                if seconds <= bound:
                    self.latency_buckets[bound] += 1

    def batch(self, kind: str, size: int, waits: list[float], seconds: float) -> None:
        """A batch the `kind` ("classify" or "generate") batcher ran."""
        with self.lock:
            counters = self.batchers[kind]
            counters.seconds += seconds
            counters.batches += 1
            counters.items += size
            counters.queue_wait_sum += sum(waits)
            counters.queue_wait_count += len(waits)

    def render(self, prompts_served: int, prompts_rejected: int) -> str:
        with self.lock:
            lines = ["# TYPE softprompt_requests_total counter"]
            for (path, status), count in sorted(self.requests.items()):
                lines.append(f'softprompt_requests_total{{path="{path}",status="{status}"}} {count}')
            lines.append("# TYPE softprompt_request_seconds histogram")
            for bound in LATENCY_BUCKETS:
                lines.append(f'softprompt_request_seconds_bucket{{le="{bound}"}} {self.latency_buckets[bound]}')
            lines += [
                f'softprompt_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"softprompt_request_seconds_sum {self.latency_sum:.6f}",
                f"softprompt_request_seconds_count {self.latency_count}",
            ]
            for counters in self.batchers.values():
                lines += counters.lines()
            lines += [
                "# TYPE softprompt_prompts gauge",
                f'softprompt_prompts{{state="served"}} {prompts_served}',
                f'softprompt_prompts{{state="rejected"}} {prompts_rejected}',
            ]
        return "\n".join(lines) + "\n"
