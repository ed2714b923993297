"""Markdown tables from what experiments/results.sh wrote: seed spread, ensemble, nearest neighbours, domain shift.

    python experiments/summarize.py > docs/results/seeds-ensemble-domain.md

Reads prompts/results/rt-seed*.safetensors (test accuracy in each file's metadata), docs/results/ensemble-smollm2.json,
docs/results/nearest-smollm2.jsonl and docs/results/domain-shift.jsonl; a missing input skips its table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from softprompt.prompt import SoftPrompt

PROMPTS = Path("prompts/results")
RESULTS = Path("docs/results")


def seeds() -> list[str]:
    files = sorted(PROMPTS.glob("rt-seed*.safetensors"))
    if not files:
        return []
    lines = ["### Five seeds of the default recipe (smollm2-135m, Rotten Tomatoes, 1,000 test sentences)", "",
             "| seed | test accuracy | best valid (300) | best step | steps run | wall s |",
             "|---|---|---|---|---|---|"]
    accuracies = []
    for path in files:
        training = SoftPrompt.load(path).training
        accuracies.append(training["test_accuracy"])
        lines.append(f"| {training['config']['seed']} | {training['test_accuracy']:.3f} | "
                     f"{training['best_valid_accuracy']:.3f} | {training['best_step']} | {training['steps_run']} | "
                     f"{training['elapsed_s']:.0f} |")
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    lines += ["", f"Mean {statistics.mean(accuracies):.3f} ± {spread:.3f} (sample std), "
                  f"min {min(accuracies):.3f}, max {max(accuracies):.3f}.", ""]
    return lines


def ensemble() -> list[str]:
    path = RESULTS / "ensemble-smollm2.json"
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    members = report["per_prompt"]
    lines = ["### Ensemble of the five seeds (one batched pass, 1,000 test sentences)", "",
             "| | test accuracy |", "|---|---|"]
    lines += [f"| {Path(name).stem} | {accuracy:.3f} |" for name, accuracy in members.items()]
    mean = statistics.mean(members.values())
    lines += [f"| mean of members | {mean:.3f} |", f"| best member | {max(members.values()):.3f} |",
              f"| **majority vote** | **{report['majority_vote']:.3f}** |",
              f"| **mean probability** | **{report['mean_probability']:.3f}** |", ""]
    return lines


def nearest() -> list[str]:
    path = RESULTS / "nearest-smollm2.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["### Nearest vocabulary tokens of the seed-0 prompt (cosine, top 5)", "",
             "| position | norm | nearest tokens (cosine) | label word? |", "|---|---|---|---|"]
    for row in rows:
        tokens = ", ".join(f"`{token!r}` {similarity:.2f}" for token, similarity in zip(row["tokens"],
                                                                                      row["similarities"]))
        lines.append(f"| {row['position']} | {row['norm']:.2f} | {tokens} | {', '.join(row['label_words'])} |")
    return lines + [""]


def domain_shift() -> list[str]:
    path = RESULTS / "domain-shift.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kinds = {"--model smollm2-135m": "prompt design", "--prompt": "prompt tuning", "--model prompts": "model tuning"}

    def kind(how: str) -> str:
        return next(name for prefix, name in kinds.items() if how.startswith(prefix))

    datasets = list(dict.fromkeys(row["data"] for row in rows))
    table = {(row["data"], kind(row["how"])): row for row in rows}
    lines = ["### Domain shift: trained on Rotten Tomatoes, scored elsewhere (first 1,000 of each set)", "",
             "| test set | prompt design | prompt tuning | model tuning |", "|---|---|---|---|"]
    for data in datasets:
        cells = [f"{table[(data, k)]['accuracy']:.3f}" if (data, k) in table else "-" for k in kinds.values()]
        lines.append(f"| {data} | {' | '.join(cells)} |")
    return lines + [""]


def main() -> None:
    sections = seeds() + ensemble() + nearest() + domain_shift()
    if not sections:
        sys.exit("nothing to summarize yet: run experiments/results.sh first")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
