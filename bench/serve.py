"""The real server on loopback: mixed-task batching vs one prompt at a time, prompt length, many clients.

    python bench/serve.py --quick        # ~4 minutes: 15 s per scenario, 200 clients for 20 s
    python bench/serve.py                # 40 s per scenario, 200 clients for 60 s
    python bench/serve.py --quick --random-model llama-1b --client-processes 8
        # GPU machines: a random-weight 1B Llama (no weights travel there), word-level stub tokenizer

Real smollm2-135m, real Rotten Tomatoes test sentences, 16 prompt files (vocab-initialised, K=20; throughput does
not depend on their values) plus one of K=1 and one of K=100. Each server is a separate `softprompt serve` process;
the load comes from this process (asyncio + httpx, N concurrent clients, each sending one-input requests
back to back until the scenario's time is up; `--client-processes N` splits them over N processes). Each scenario
also reports, from the server's /metrics, its mean batch size and the share of the time the model was busy: a
model busy well under 100% means the ceiling is the HTTP side or the load generator, not the model. Scenarios:
  (a) single: every request to one prompt;   (b) mixed: requests spread over the 16 prompts;
  (c) sequential: as (b), but the server batches one prompt at a time (`--batching per-prompt`, how servers
      without per-example prompts must work);   (d) p50 latency of K=100 vs K=1, one client;
  (e) 200 concurrent clients on the mixed server: errors counted.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import torch
from random_models import LLAMA_SHAPES, save_random_llama


def make_prompts(directory: Path, model: str) -> None:
    from softprompt import load_model
    from softprompt.data import sentiment_task
    from softprompt.initializers import initialize
    from softprompt.prompt import SoftPrompt

    backbone = load_model(model)
    task = sentiment_task("rotten-tomatoes")
    for index in range(16):
        embeddings = initialize("vocab", backbone, 20, task, seed=index)
        SoftPrompt(embeddings, backbone.name, backbone.fingerprint, task, init="vocab").save(
            directory / f"p{index:02d}.safetensors")
    for length in (1, 100):
        embeddings = initialize("vocab", backbone, length, task, seed=100 + length)
        SoftPrompt(embeddings, backbone.name, backbone.fingerprint, task, init="vocab").save(
            directory / f"k{length}.safetensors")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_texts() -> list[str]:
    """Real Rotten Tomatoes test sentences; where the dataset package is absent (the GPU machine), seeded word
    salad of the same lengths (5-40 words): throughput depends on lengths, not on meaning."""
    from softprompt import load_dataset
    from softprompt.errors import SoftPromptError

    try:
        return [example.fields["text"] for example in load_dataset("rotten-tomatoes").test[:400]]
    except SoftPromptError:
        rng = random.Random(0)
        words = [f"w{i}" for i in range(2000)]
        return [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(400)]


def cpu_seconds(pid: int, main_thread_only: bool = False) -> float:
    """User + system CPU time a process has used, all its threads or its main thread (the server's event loop;
    Linux /proc)."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, model: str, prompts: Path, batching: str, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "softprompt", "serve", "--model", model, "--prompts", str(prompts),
             "--port", str(self.port), "--batching", batching, "--max-batch", str(max_batch), "--max-wait-ms", "5"],
            stdout=subprocess.DEVNULL)

    def __enter__(self) -> Server:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def load(url: str, prompt_names: list[str], texts: list[str], clients: int, seconds: float,
               first_client: int = 0) -> tuple[list[float], int, float]:
    """`clients` concurrent loops of one-input requests until `seconds` pass; bounded in time by construction.
    Returns the successful requests' latencies, the error count and the elapsed seconds."""
    latencies, errors = [], 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client(number: int) -> None:
            nonlocal errors
            sent = 0
            while time.perf_counter() < deadline:
                name = prompt_names[(number + sent) % len(prompt_names)]
                text = texts[(number * 7 + sent) % len(texts)]
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/classify", json={"prompt": name, "inputs": [text]})
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                sent += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client(first_client + n) for n in range(clients)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def _load_in_process(arguments: tuple) -> tuple[list[float], int, float]:
    return asyncio.run(load(*arguments))


def server_counters(url: str) -> dict[str, float]:
    """The batcher's counters from GET /metrics: batches, items, seconds the model was busy."""
    wanted = {"softprompt_batches_total": "batches", "softprompt_batch_items_total": "items",
              "softprompt_batch_seconds_sum": "model_s"}
    counters = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            counters[wanted[name]] = float(value)
    return counters


def scenario(server: Server, prompt_names: list[str], texts: list[str], clients: int, seconds: float,
             processes: int = 1) -> dict:
    """Run the load (split over `processes` client processes, so one Python process is not the ceiling) and
    summarise it, with the server's mean batch size, the share of the time its model was busy and the server
    process's CPU time per request (its own ceiling, whatever the load generator manages), of which its event loop
    (HTTP parsing, validation, responses: the thread every request passes through)."""
    url = server.url
    pid = server.process.pid
    before, cpu_before, loop_before = server_counters(url), cpu_seconds(pid), cpu_seconds(pid, main_thread_only=True)
    shares = [clients // processes + (index < clients % processes) for index in range(processes)]
    jobs = [(url, prompt_names, texts, share, seconds, sum(shares[:index])) for index, share in enumerate(shares)
            if share]
    if len(jobs) == 1:
        parts = [_load_in_process(jobs[0])]
    else:
        with ProcessPoolExecutor(len(jobs)) as pool:
            parts = list(pool.map(_load_in_process, jobs))
    after, cpu_after, loop_after = server_counters(url), cpu_seconds(pid), cpu_seconds(pid, main_thread_only=True)
    latencies = sorted(latency for part in parts for latency in part[0]) or [float("nan")]
    elapsed = max(part[2] for part in parts)
    batches = max(after["batches"] - before["batches"], 1)
    ok = sum(len(part[0]) for part in parts)
    return {"rps": ok / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "ok": ok, "errors": sum(part[1] for part in parts),
            "mean_batch": (after["items"] - before["items"]) / batches,
            "model_busy": (after["model_s"] - before["model_s"]) / elapsed,
            "server_cpu_ms": 1000 * (cpu_after - cpu_before) / max(ok, 1),
            "event_loop_ms": 1000 * (loop_after - loop_before) / max(ok, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m", help="Model to serve (name or directory).")
    parser.add_argument("--random-model", choices=sorted(LLAMA_SHAPES),
                        help="Serve a random-weight Llama of this shape instead of --model.")
    parser.add_argument("--seconds", type=float, help="Override the seconds per scenario (smoke runs).")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="Split the clients over this many processes (machines with cores to spare).")
    args = parser.parse_args()
    seconds, soak = (15, 20) if args.quick else (40, 60)
    if args.seconds:
        seconds, soak = args.seconds, args.seconds
    torch.set_num_threads(1)  # the client side; the server processes use their own threads

    texts = request_texts()
    sixteen = [f"p{i:02d}" for i in range(16)]
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        prompts = Path(directory) / "prompts"
        prompts.mkdir()
        model = args.model
        if args.random_model:
            model = str(save_random_llama(Path(directory) / args.random_model, args.random_model,
                                          [word for text in texts for word in text.split()]))
        make_prompts(prompts, model)
        processes = args.client_processes
        with Server(model, prompts, "mixed", args.max_batch) as server:
            scenario(server, ["p00"], texts, 4, 3)  # warm-up
            results["single"] = scenario(server, ["p00"], texts, args.clients, seconds, processes)
            results["mixed"] = scenario(server, sixteen, texts, args.clients, seconds, processes)
            results["k1"] = scenario(server, ["k1"], texts, 1, seconds / 2)
            results["k100"] = scenario(server, ["k100"], texts, 1, seconds / 2)
            results["soak"] = scenario(server, sixteen, texts, 200, soak, processes)
        with Server(model, prompts, "per-prompt", args.max_batch) as server:
            scenario(server, ["p00"], texts, 4, 3)
            results["sequential"] = scenario(server, sixteen, texts, args.clients, seconds, processes)
    for name, result in results.items():
        print(f"{name:>10}: {result['rps']:7.1f} req/s  p50 {result['p50_ms']:8.1f} ms  p99 {result['p99_ms']:8.1f} ms"
              f"  ok {result['ok']}  errors {result['errors']}  mean batch {result['mean_batch']:5.1f}"
              f"  model busy {result['model_busy']:4.0%}  server CPU {result['server_cpu_ms']:5.2f} ms/request"
              f" (event loop {result['event_loop_ms']:4.2f})",
              file=sys.stderr)
    summary = {
        "single_rps": round(results["single"]["rps"], 2),
        "mixed_rps": round(results["mixed"]["rps"], 2),
        "sequential_rps": round(results["sequential"]["rps"], 2),
        "mixed_vs_single": round(results["mixed"]["rps"] / results["single"]["rps"], 3),
        "mixed_vs_sequential": round(results["mixed"]["rps"] / results["sequential"]["rps"], 3),
        "len100_vs_len1_p50": round(results["k100"]["p50_ms"] / results["k1"]["p50_ms"], 3),
        "clients": 200,
        "errors": results["soak"]["errors"] + sum(r["errors"] for k, r in results.items() if k != "soak"),
    }
    print(json.dumps({"model": args.random_model or args.model, **summary}))


if __name__ == "__main__":
    main()
