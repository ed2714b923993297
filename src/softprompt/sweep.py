"""Sweeps: a grid over model x method x prompt length x init x seed, resumable, with a table and a plot.

Each finished cell is appended to `<out>.jsonl` at once, so an interrupted sweep resumes where it stopped
(finished cells are skipped). `<out>.md` (table) and `<out>.png` (test accuracy against prompt length, one line
per model/method/init, mean over seeds) are rewritten after every cell.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .backbone import Backbone
from .data import Dataset
from .errors import SoftPromptError
from .evaluate import evaluate
from .files import write_text_atomically
from .loader import load_model
from .train import TrainConfig, train

KEYS = ("model", "method", "length", "init", "seed")


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    length: int
    init: str
    seed: int


def grid(models: list[str], methods: list[str], lengths: list[int], inits: list[str], seeds: list[int]) -> list[Cell]:
    """Every combination; a model-tuning cell has no prompt, so it has no length or init (one per model/seed)."""
    cells = []
    for model, method, length, init, seed in itertools.product(models, methods, lengths, inits, seeds):
        cell = Cell(model, method, 0, "-", seed) if method == "model-tuning" else Cell(model, method, length, init,
                                                                                         seed)
        if cell not in cells:
            cells.append(cell)
    return cells


def finished(path: Path) -> dict[tuple, dict]:
    """The last result recorded for each cell; failed cells are not finished (a rerun retries them)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {tuple(row[key] for key in KEYS): row for row in rows}
    return {key: row for key, row in latest.items() if row.get("status") != "failed"}


def run_sweep(
    cells: list[Cell],
    dataset: Dataset,
    out: str | Path,
    base: TrainConfig,
    test_limit: int | None = None,
    load: Callable[[str], Backbone] = load_model,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    out = Path(out)
    results_path = out.with_suffix(".jsonl")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = finished(results_path)
    backbones: dict[str, Backbone] = {}
    test = dataset.test[:test_limit] if test_limit else dataset.test
    def record(row: dict) -> None:
        with results_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        done[tuple(row[k] for k in KEYS)] = row
        write_report(list(done.values()), out)

    for number, cell in enumerate(cells, start=1):
        key = tuple(asdict(cell)[k] for k in KEYS)
        if key in done:
            continue
        progress(f"[{number}/{len(cells)}] {cell}")
        if cell.model not in backbones:
            backbones.clear()  # one model in memory at a time
            backbones[cell.model] = load(cell.model)
        backbone = backbones[cell.model]
        size = sum(p.numel() for p in backbone.model.parameters())
        baseline = (cell.model, "hand-written", 0, "-", 0)
        if baseline not in done:  # the "prompt design" line: the template alone, same test examples
            report = evaluate(backbone, test, task=dataset.task, max_input_tokens=base.max_input_tokens)
            record({**dict(zip(KEYS, baseline)), "test_accuracy": report.accuracy, "test_macro_f1": report.macro_f1,
                    "best_valid_accuracy": None, "best_step": 0, "steps_run": 0, "wall_s": 0.0,
                    "test_examples": report.n, "task": dataset.task.name, "parameters": size})
        config = TrainConfig(**{**asdict(base), "prompt_length": cell.length, "init": cell.init,
                                "seed": cell.seed, "method": cell.method})
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as scratch:
                result = train(backbone, dataset.task, dataset.train, dataset.validation, Path(scratch) / "result",
                               config, show_progress=False)
                report = evaluate(result.backbone or backbone, test, result.prompt, task=dataset.task,
                                  max_input_tokens=config.max_input_tokens)
        except (SoftPromptError, RuntimeError, MemoryError) as error:  # CUDA out-of-memory is a RuntimeError
            progress(f"  failed: {error}")
            record({**asdict(cell), "status": "failed", "error": f"{type(error).__name__}: {error}",
                    "wall_s": round(time.perf_counter() - started, 1), "task": dataset.task.name, "parameters": size})
            continue
        record({**asdict(cell), "status": "ok", "test_accuracy": report.accuracy, "test_macro_f1": report.macro_f1,
                "best_valid_accuracy": result.best_metric, "best_step": result.best_step,
                "steps_run": result.steps_run, "wall_s": round(time.perf_counter() - started, 1),
                "test_examples": report.n, "task": dataset.task.name, "parameters": size})
    rows = list(done.values())
    write_report(rows, out)
    return rows


def write_report(rows: list[dict], out: Path) -> None:
    """Markdown table (mean ± spread over seeds) and a PNG of test accuracy against prompt length; failed cells
    are listed under the table with their reason."""
    failed = [row for row in rows if row.get("status") == "failed"]
    rows = [row for row in rows if row.get("status") != "failed"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], row["init"], row["length"]), []).append(row)
    lines = ["| model | method | init | length | seeds | test accuracy | best valid | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, method, init, length), group in sorted(groups.items()):
        accuracies = [r["test_accuracy"] for r in group]
        spread = f" ± {statistics.stdev(accuracies):.3f}" if len(accuracies) > 1 else ""
        lines.append(f"| {model} | {method} | {init} | {length} | {len(group)} | "
                     f"{statistics.mean(accuracies):.3f}{spread} | "
                     f"{_mean_or_dash([r['best_valid_accuracy'] for r in group])} | "
                     f"{statistics.mean(r['wall_s'] for r in group):.0f} |")
    if failed:
        lines += ["", "Failed cells:", ""] + [
            f"* {row['model']} {row['method']} {row['init']} K={row['length']} seed {row['seed']}: {row['error']}"
            for row in failed]
    write_text_atomically(out.with_suffix(".md"), "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    lines_by_series: dict[tuple, dict[int, float]] = {}
    for (model, method, init, length), group in groups.items():
        lines_by_series.setdefault((model, method, init), {})[length] = statistics.mean(
            r["test_accuracy"] for r in group)
    all_lengths = sorted({length for (_, method, _, length) in groups if method != "hand-written"})
    for (model, method, init), points in sorted(lines_by_series.items()):
        if method in ("hand-written", "model-tuning"):  # no prompt length: a horizontal reference line
            axes.axhline(points[0], linestyle="--" if method == "hand-written" else ":",
                         color=f"C{len(axes.lines) % 10}", label=f"{model} {method.replace('-', ' ')}")
            continue
        lengths = sorted(points)
        axes.plot(lengths, [points[k] for k in lengths], marker="o", label=f"{model} {method} {init}")
    _finish(figure, axes, all_lengths, [str(k) for k in all_lengths], "prompt length K (log scale)",
            f"{rows[0]['task'] if rows else ''}: test accuracy vs prompt length", out.with_suffix(".png"))
    if len({row["model"] for row in rows if row.get("parameters")}) > 1:
        write_size_plot(rows, out.with_name(out.name + "-by-size.png"))


def write_size_plot(rows: list[dict], png: Path) -> None:
    """The paper's Figure 1 analogue: test accuracy against model size, one line per method (mean over seeds)."""
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if not row.get("parameters"):
            continue
        if row["method"] == "hand-written":
            name = "prompt design (hand-written template)"
        elif row["method"] == "model-tuning":
            name = "model tuning (all weights)"
        else:
            name = f"{'prompt tuning' if row['method'] == 'prompt' else 'deep prompt'} K={row['length']} {row['init']}"
        series.setdefault(name, {}).setdefault(row["parameters"], []).append(row["test_accuracy"])
    names = {row["parameters"]: row["model"] for row in rows if row.get("parameters")}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        sizes = sorted(points)
        axes.plot(sizes, [statistics.mean(points[s]) for s in sizes], marker="o", label=name)
    _finish(figure, axes, sorted(names), [f"{names[s]}\n{s / 1e6:.0f}M" for s in sorted(names)],
            "model (parameters, log scale)", f"{rows[0]['task']}: accuracy vs model size", png)


def _finish(figure, axes, ticks: list, tick_labels: list[str], xlabel: str, title: str, png: Path) -> None:
    """Log x axis with the given ticks, labels, grid, legend; then written atomically."""
    import matplotlib.pyplot as plt

    axes.set_xscale("log")
    if ticks:
        axes.set_xticks(ticks, tick_labels, fontsize=8)
        axes.minorticks_off()
    axes.set_xlabel(xlabel)
    axes.set_ylabel("test accuracy")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    tmp.replace(png)


def _mean_or_dash(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3f}" if values else "-"
