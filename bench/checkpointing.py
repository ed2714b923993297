"""Activation checkpointing: memory and time of a training step, with and without it, on long inputs.

    python bench/checkpointing.py [--steps 3] [--batch 8] [--tokens 256] [--prompt-length 20]

Real smollm2-135m, real 20newsgroups posts cut to `--tokens` tokens (long inputs are where activations dominate).
Four ways to run the same step: the default path (prompt and tokens packed in one pass, the prompt's keys/values
handed to attention as plain tensors), the concat reference path, and each of them with `--activation-checkpointing`
(what `softprompt train` runs: the packed pass where the model family allows it, concat elsewhere, since
checkpointed layers drop a cache object). Each runs in its own process; memory = peak RSS above the loaded model
and data over all steps (sampled every 2 ms), time = mean ms/step after one warm-up step. Ends with one JSON line
per mode and the ratios against the cached path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

from peak_rss import PeakRSS

MODES = {"cached": dict(route=None), "concat": dict(route="concat"),
         "cached+checkpointing": dict(route=None, activation_checkpointing=True),
         "concat+checkpointing": dict(route="concat", activation_checkpointing=True)}


def measure(mode: str, steps: int, batch: int, tokens: int, prompt_length: int) -> dict:
    import torch

    from softprompt import load_dataset, load_model
    from softprompt.data import TaskTokenizer
    from softprompt.initializers import initialize
    from softprompt.routes import Route
    from softprompt.train import prompt_loss

    backbone = load_model("smollm2-135m")
    data = load_dataset("20newsgroups")
    task_tokenizer = TaskTokenizer(backbone, data.task, tokens)
    items = task_tokenizer.encode_all(data.train[:batch])
    prompt = torch.nn.Parameter(initialize("class-label", backbone, prompt_length, data.task, 0))
    options = MODES[mode]

    def step() -> None:
        checkpointing = options.get("activation_checkpointing")
        with backbone.activation_checkpointing() if checkpointing else contextlib.nullcontext():
            route = {"route": Route.CONCAT} if options["route"] == "concat" else {}
            prompt_loss(backbone, task_tokenizer, items, {"prompts": prompt[None], **route}).backward()
        prompt.grad = None

    with PeakRSS() as peak:
        step()  # warm-up: counted for memory, not for time
        started = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - started
    return {"mode": mode, "prompt_length": prompt_length, "ms_per_step": round(1000 * elapsed / steps, 1),
            "peak_mib": round(peak.mib), "tokens": sum(len(i.input_ids) for i in items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.steps, args.batch, args.tokens, args.prompt_length)))
        return
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--tokens", str(args.tokens), "--prompt-length", str(args.prompt_length)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        print(f"{mode:>22}: {results[mode]['ms_per_step']:8.1f} ms/step  peak +{results[mode]['peak_mib']} MiB",
              file=sys.stderr)
    base = results["cached"]
    for result in results.values():
        result["time_ratio"] = round(result["ms_per_step"] / base["ms_per_step"], 2)
        result["memory_ratio"] = round(result["peak_mib"] / max(base["peak_mib"], 1), 2)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
