"""The model-tuning baseline: every weight of the model trains, on the same data, loss and schedule as a prompt.

This is the paper's point of comparison (its Figure 1: the gap between prompt tuning and model tuning closes as
models grow). The caller's frozen backbone is left untouched: a copy trains. The best copy by validation accuracy
is saved as a normal Hugging Face checkpoint directory (weights + tokenizer + `softprompt-training.json`), which
`--model DIR` loads like any other model. No resume: a run is a few hundred steps.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .backbone import Backbone, load_model
from .data import Encoder, Example
from .errors import SoftPromptError
from .files import write_directory_atomically
from .tasks import TaskSpec
from .train import (
    TrainConfig,
    batch_for_step,
    check_finite,
    log_record,
    make_optimizer,
    make_schedule,
    prompt_loss,
    status_text,
    training_progress,
    validation_metric,
)

TRAINING_FILE = "softprompt-training.json"


@dataclass
class ModelTuningResult:
    backbone: Backbone  # the best tuned model, loaded back from `out`
    best_metric: float
    best_step: int
    steps_run: int
    stopped_early: bool
    history: list[dict]


def tune_model(
    backbone: Backbone,
    task: TaskSpec,
    train_examples: list[Example],
    valid_examples: list[Example],
    out: str | Path,
    config: TrainConfig | None = None,
    show_progress: bool = True,
) -> ModelTuningResult:
    """Fine-tune all weights of a copy of `backbone`; the best checkpoint is written to the directory `out`."""
    if backbone.is_encoder_only:
        raise SoftPromptError("model tuning here tunes a language model that scores label words; an encoder-only "
                              "model has no such head")
    config = replace(config or TrainConfig(), method="model-tuning")
    if not task.is_classification and config.objective == "rank":
        config = replace(config, objective="lm")
    if not train_examples:
        raise SoftPromptError("the training set is empty")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SoftPromptError(f"model tuning saves a checkpoint directory; {out} is a file")
    check_memory(backbone)
    state = _train_copy(backbone, task, train_examples, valid_examples, out, config, show_progress)
    # The training copy and its optimizer are gone by now; the best weights come back from disk.
    best = load_model(str(out), backbone.precision)
    return ModelTuningResult(best, state["best_metric"], state["best_step"], state["step"], state["stopped_early"],
                             state["history"])


BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight + gradient + AdamW's two moments


def check_memory(backbone: Backbone) -> None:
    """Refuse up front, with numbers, rather than be killed by the OOM killer halfway through."""
    parameters = sum(p.numel() for p in backbone.model.parameters())
    needed = parameters * BYTES_PER_TRAINED_PARAMETER * 1.1  # + ~10% for activations at these batch sizes
    if backbone.device.type == "cuda":
        available = torch.cuda.mem_get_info(backbone.device)[0]
    else:
        available = available_memory()
    if available is not None and needed > available:
        raise SoftPromptError(
            f"model tuning {backbone.name} ({parameters / 1e6:.0f}M parameters) needs about {needed / 2**30:.1f} GiB "
            f"({BYTES_PER_TRAINED_PARAMETER} bytes per parameter + activations); {available / 2**30:.1f} GiB is free")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _train_copy(backbone: Backbone, task: TaskSpec, train_examples: list[Example], valid_examples: list[Example],
                out: Path, config: TrainConfig, show_progress: bool) -> dict:
    log_path = out.with_name(out.name + ".log.jsonl")
    log_path.unlink(missing_ok=True)
    # fp32 weights to train, the head tied again (a half-precision load stores frozen linear weights in half)
    model = copy.deepcopy(backbone.model).float()
    model.tie_weights()
    tuned = Backbone(model, backbone.tokenizer, backbone.name, backbone.precision)
    model.requires_grad_(True)  # Backbone froze the copy; here every weight is a parameter to train
    encoder = Encoder(tuned, task, config.max_input_tokens)
    train_items = encoder.encode_all(train_examples)
    valid_items = encoder.encode_all(valid_examples[: config.valid_limit] if config.valid_limit else valid_examples)
    if not valid_items:
        raise SoftPromptError("the validation set is empty")
    optimizer = make_optimizer(config, list(model.parameters()))
    scheduler = make_schedule(config, optimizer)
    scaler = tuned.loss_scaler()

    def save(state: dict) -> None:
        record = {"base_model": backbone.name, "task": task.to_dict(), "config": asdict(config),
                  "best_step": state["best_step"], "best_valid_accuracy": state["best_metric"],
                  "train_examples": len(train_items), "valid_examples": len(valid_items)}

        def write(directory: Path) -> None:
            model.save_pretrained(directory)
            backbone.tokenizer.save_pretrained(directory)
            (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

        write_directory_atomically(out, write)

    state = {"step": 0, "best_metric": validation_metric(tuned, encoder, valid_items, None, task),
             "best_step": 0, "bad_evals": 0, "history": [], "stopped_early": False}
    log_record(log_path, state, {"step": 0, "valid_accuracy": state["best_metric"], "elapsed_s": 0.0})
    save(state)
    started = time.perf_counter()
    running_loss, running_count = 0.0, 0
    with training_progress(show_progress) as progress:
        bar = progress.add_task(status_text(state, None), total=config.steps)
        while state["step"] < config.steps:
            indices = batch_for_step(train_items, config, state["step"])
            route = "cached" if config.route == "auto" else config.route
            loss = prompt_loss(tuned, encoder, [train_items[i] for i in indices], None, route, config.objective)
            check_finite(loss, state["step"], tuned.precision)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state["step"] += 1
            running_loss, running_count = running_loss + loss.item(), running_count + 1
            progress.update(bar, advance=1, description=status_text(state, running_loss / running_count))
            if state["step"] % config.eval_every == 0 or state["step"] == config.steps:
                metric = validation_metric(tuned, encoder, valid_items, None, task)
                if metric > state["best_metric"]:
                    state.update(best_metric=metric, best_step=state["step"], bad_evals=0)
                    save(state)
                else:
                    state["bad_evals"] += 1
                log_record(log_path, state, {"step": state["step"], "loss": running_loss / running_count,
                                             "valid_accuracy": metric,
                                             "elapsed_s": round(time.perf_counter() - started, 2)})
                running_loss, running_count = 0.0, 0
                progress.update(bar, description=status_text(state, None))
                if config.patience and state["bad_evals"] >= config.patience:
                    state["stopped_early"] = True
                    break
    return state
