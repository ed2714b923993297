"""What a mixed serving batch costs with its padding computed, split off, or dropped.

    python bench/padding.py                              # real smollm2-135m, real Rotten Tomatoes sentences
    python bench/padding.py --random-model llama-1b      # GPU machines: random weights, word-level stub tokenizer

A PromptBank holding 16 prompts (K=20) classifies batches of requests, each to a random prompt, with real sentence
lengths, three ways, alternating batch by batch after a warm-up:
  padded:  one forward pass over right-padded rows (`CausalLM.drops_padding` off, `PromptBank.max_padding` 1.0);
  split:   length-sorted parts with at most 25% padding each (`max_padding` 0.25, the former CPU default);
  dropped: one forward pass over the real tokens only (`drops_padding` on: `prompt_attention.RaggedRows`).
Prints the median ms per batch and per request, the share of padded positions, the ratios against "padded", and
the largest probability difference between the ways; ends with one JSON line per batch size. (PEFT has no
counterpart: it cannot put prompts for different tasks in one batch; bench/serve.py compares the server with the
one-prompt-at-a-time baseline.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from random_models import LLAMA_SHAPES, save_random_llama
from serve import request_texts

WAYS = {"padded": (False, 1.0), "split": (False, 0.25), "dropped": (True, 1.0)}  # (drops_padding, max_padding)


def make_bank(model: str):
    from softprompt import load_model
    from softprompt.bank import PromptBank
    from softprompt.data import sentiment_task
    from softprompt.initializers import initialize
    from softprompt.prompt import SoftPrompt

    backbone = load_model(model)
    task = sentiment_task("rotten-tomatoes")
    bank = PromptBank(backbone)
    for index in range(16):
        embeddings = initialize("vocab", backbone, 20, task, seed=index)
        bank.add(f"p{index:02d}", SoftPrompt(embeddings, backbone.name, backbone.fingerprint, task, init="vocab"))
    return bank


def padding_share(bank, batch: list[tuple[str, dict[str, str]]]) -> float:
    """Of the input positions a padded batch computes (label tokens aside)."""
    from softprompt.data import Example

    lengths = [len(bank.entry(name).task_tokenizer.encode(Example(fields, None, None, "request")).input_ids)
               for name, fields in batch]
    return 1 - sum(lengths) / (len(lengths) * max(lengths))


def run(bank, way: str, batch: list[tuple[str, dict[str, str]]]) -> tuple[float, list]:
    bank.backbone.drops_padding, bank.max_padding = WAYS[way]
    started = time.perf_counter()
    predictions = bank.classify(batch)  # its scores come back to the CPU: the device has finished
    return time.perf_counter() - started, predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-model", choices=sorted(LLAMA_SHAPES),
                        help="A random-weight Llama of this shape instead of --model.")
    parser.add_argument("--batch", default="4,16,32", help="Comma-separated batch sizes.")
    parser.add_argument("--batches", type=int, default=8, help="Timed batches per way and batch size.")
    args = parser.parse_args()

    texts = request_texts()
    with tempfile.TemporaryDirectory() as directory:
        model = args.model
        if args.random_model:
            model = str(save_random_llama(Path(directory) / args.random_model, args.random_model,
                                          [word for text in texts for word in text.split()]))
        bank = make_bank(model)
    device = bank.backbone.device
    print(f"{args.random_model or args.model} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}"
          f", {torch.get_num_threads()} threads, precision {bank.backbone.precision}")
    rng = random.Random(0)
    for size in (int(size) for size in args.batch.split(",")):
        batches = [[(f"p{rng.randrange(16):02d}", {"text": rng.choice(texts)}) for _ in range(size)]
                   for _ in range(args.batches + 1)]
        seconds = {way: [] for way in WAYS}
        difference = {way: 0.0 for way in WAYS if way != "padded"}  # largest probability difference to padded
        for number, batch in enumerate(batches):
            answers = {}
            for way in WAYS:
                elapsed, answers[way] = run(bank, way, batch)
                if number:  # the first batch warms up
                    seconds[way].append(elapsed)
            for way in difference:
                difference[way] = max([difference[way]] + [abs(a.scores[label] - b.scores[label])
                                      for a, b in zip(answers["padded"], answers[way]) for label in a.scores])
        ms = {way: 1000 * statistics.median(values) for way, values in seconds.items()}
        share = statistics.mean(padding_share(bank, batch) for batch in batches[1:])
        for way, value in ms.items():
            print(f"batch {size:3d}  {way:8s} {value:9.1f} ms/batch  {value / size:7.1f} ms/request  "
                  f"{ms['padded'] / value:5.2f}x")
        print(f"batch {size:3d}  padding {share:.0%} of positions; largest probability difference to padded: "
              + ", ".join(f"{way} {value:.1e}" for way, value in difference.items()))
        print(json.dumps({"model": args.random_model or args.model, "batch": size, "padding_share": round(share, 3),
                          **{f"{way}_ms": round(value, 2) for way, value in ms.items()},
                          "dropped_vs_padded": round(ms["padded"] / ms["dropped"], 3),
                          "dropped_vs_split": round(ms["split"] / ms["dropped"], 3),
                          **{f"{way}_probability_difference": value for way, value in difference.items()}}))


if __name__ == "__main__":
    main()
