"""The one training loop: prompt tuning, deep prompts and the model-tuning baseline.

The method (`make_method`: trainable.PromptTuning or model_tuning.ModelTuning) supplies what trains, what
validation scores with and how the best is saved; the loop owns the rest. Validation every `eval_every` steps keeps
the best; `patience` evaluations without improvement stop early. For prompts, a checkpoint next to the output
(`<out>.ckpt.safetensors`) lets `resume=True` continue an interrupted run exactly: the data order is a pure
function of (seed, step). Metrics are appended to `<out>.log.jsonl`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.optimization import Adafactor

from . import distributed
from .backbone import Backbone, PromptCache
from .config import DEFAULT_LR, MODEL_TUNING_LR, TrainConfig  # noqa: F401 (the LRs: re-exported)
from .data import Example, TaskTokenizer, TokenizedExample
from .errors import SoftPromptError
from .evaluate import generate_texts, label_scores, sum_label_tokens
from .files import write_atomically
from .model_tuning import ModelTuning
from .prompt import SoftPrompt
from .routes import Route
from .tasks import TaskSpec
from .trainable import PromptTuning


@dataclass
class TrainResult:
    prompt: SoftPrompt | None  # the best prompt (prompt methods)
    best_metric: float
    best_step: int
    steps_run: int
    stopped_early: bool
    history: list[dict]
    backbone: Backbone | None = None  # the best tuned model, loaded back from `out` (model tuning)


def make_optimizer(config: TrainConfig, parameters: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return Adafactor(parameters, lr=config.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer,
                  start_step: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear decay lets a noisy small-batch run settle instead of oscillating around the optimum."""
    if config.schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1 - (start_step + step) / config.steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # "constant", the other choice


def batch_order(items: list[TokenizedExample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length (little padding), a pure function of (seed, epoch)."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(items)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(items[i].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [batch for batch in batches if len(batch) == batch_size] or batches


def batch_for_step(items: list[TokenizedExample], config: TrainConfig, step: int) -> list[int]:
    # batch_order keeps only full batches (windows are whole multiples of the batch size), or the one partial
    # batch when there are fewer items than a batch: the count follows without building an order.
    per_epoch = max(1, len(items) // config.batch_size)
    return batch_order(items, config.batch_size, config.seed, step // per_epoch)[step % per_epoch]


def prompt_loss(backbone: Backbone, task_tokenizer: TaskTokenizer, items: list[TokenizedExample], inputs: dict,
                objective: str = "rank") -> torch.Tensor:
    """Loss on the label tokens only, mean over examples; `inputs`: `target_logprobs` keyword arguments (the
    prompt, or its cache; none for model tuning).

    "lm": negative log-likelihood of the gold label's tokens over the whole vocabulary (the paper's objective).
    "rank": cross-entropy over the labels' summed log-probs, i.e. exactly what rank classification decides on.
    """
    if objective == "lm":
        batch = task_tokenizer.training_batch(items)
        return -backbone.target_logprobs(batch, **inputs).sum() / len(items)
    batch, groups = task_tokenizer.scoring_batch(items)
    logprobs = backbone.target_logprobs(batch, **inputs)
    scores = sum_label_tokens(logprobs, groups, len(items), len(task_tokenizer.label_ids))
    gold = torch.tensor([item.label for item in items], device=scores.device)
    return torch.nn.functional.cross_entropy(scores, gold)


@torch.no_grad()
def validation_metric(backbone: Backbone, task_tokenizer: TaskTokenizer, items: list[TokenizedExample],
                      cache: PromptCache, task: TaskSpec) -> float:
    """Accuracy (classification) or exact match of greedy decoding (generation) of the runs starting at `cache`.
    Under torch.distributed each process scores its shard and the counts are summed."""
    total = len(items)
    items = distributed.shard(items)
    correct = 0
    if items and not task.is_classification:
        outputs = generate_texts(backbone, task_tokenizer, items, cache, max_new_tokens=16)
        targets = [backbone.tokenizer.decode(item.target_ids, skip_special_tokens=True) for item in items]
        correct = sum(out.strip() == target.strip() for out, target in zip(outputs, targets))
    elif items:
        predicted = label_scores(backbone, task_tokenizer, items, cache=cache).argmax(1).tolist()
        correct = sum(p == item.label for p, item in zip(predicted, items))
    return distributed.all_reduce_sum(torch.tensor(float(correct), device=backbone.device)).item() / total


def make_method(backbone: Backbone, task: TaskSpec, config: TrainConfig, out: Path) -> PromptTuning | ModelTuning:
    """The one place the training method is chosen, and what it needs of the model checked."""
    if config.route == "concat":
        backbone.require("concat_prompts", "--route concat")
    if config.method == "model-tuning":
        if distributed.world_size() > 1:
            raise SoftPromptError("model tuning runs in one process; drop --devices / torchrun")
        return ModelTuning(backbone, task, config, out)
    return PromptTuning(backbone, task, config)  # "prompt" or "prefix" (TrainConfig checked the name)


def train(backbone: Backbone, task: TaskSpec, train_examples: list[Example], valid_examples: list[Example],
          out: str | Path, config: TrainConfig | None = None, resume: bool = False,
          show_progress: bool = True, resume_anyway: bool = False) -> TrainResult:
    """Train by `config.method`; the best (by validation) is saved to `out` and returned. `resume`: continue the
    run checkpointed next to `out`, which must have had the same settings and data (`resume_anyway`: accept
    changed settings and data, not changed shapes)."""
    config = config or TrainConfig()
    if not task.is_classification and config.objective == "rank":
        config = replace(config, objective="lm")  # nothing to rank: learn the target text itself
    if not train_examples:
        raise SoftPromptError("the training set is empty")
    if config.batch_size < distributed.world_size():
        raise SoftPromptError(f"batch size {config.batch_size} is smaller than the {distributed.world_size()} "
                              "processes it is split across")
    torch.manual_seed(config.seed)
    run = TrainingRun(backbone, task, train_examples, valid_examples, Path(out), config)
    run.start(resume, resume_anyway)
    run.loop(show_progress)
    return run.finish()


class TrainingRun:
    """One run of the loop: the method's parameters, the optimizer, counters, the best so far, files."""

    def __init__(self, backbone: Backbone, task: TaskSpec, train_examples: list[Example],
                 valid_examples: list[Example], out: Path, config: TrainConfig):
        self.task, self.out, self.config = task, out, config
        self.checkpoint_path = out.with_name(out.name + ".ckpt.safetensors")
        self.log_path = out.with_name(out.name + ".log.jsonl")
        self.task_tokenizer = TaskTokenizer(backbone, task, config.max_input_tokens)
        self.train_items = self.task_tokenizer.encode_all(train_examples)
        self.data_fingerprint = data_fingerprint(train_examples, valid_examples)
        valid = valid_examples[: config.valid_limit] if config.valid_limit else valid_examples
        self.valid_items = self.task_tokenizer.encode_all(valid)
        if not self.valid_items:
            raise SoftPromptError("the validation set is empty")
        self.method = make_method(backbone, task, config, out)
        self.model = self.method.model  # what the loss runs on: the frozen model, or the copy that trains
        if config.compile or config.compile_mode:
            self.model.compile(config.compile_mode)
        self.parameters = self.method.parameters()
        self.optimizer = make_optimizer(config, self.parameters)
        self.scaler = self.model.loss_scaler()
        self.state = {"step": 0, "best_metric": -1.0, "best_step": 0, "bad_evals": 0, "history": []}
        self.best = self.method.current()
        self.stopped_early = False
        self.started = time.perf_counter()

    def start(self, resume: bool, resume_anyway: bool = False) -> None:
        """Continue from the checkpoint, or start afresh with the starting point's validation (step 0)."""
        if resume and not self.method.resumable:
            raise SoftPromptError(f"--resume: {self.config.method} runs cannot be resumed; start it again")
        if resume and not self.checkpoint_path.exists():
            raise SoftPromptError(f"--resume: no checkpoint at {self.checkpoint_path}")
        if resume:
            self.state, self.best = _load_checkpoint(self.checkpoint_path, self.method.trainable, self.optimizer,
                                                     self.scaler, self.config, self.data_fingerprint, resume_anyway)
        elif self.log_path.exists() and distributed.is_main():
            self.log_path.unlink()  # a fresh run starts a fresh log
        self.scheduler = make_schedule(self.config, self.optimizer, start_step=self.state["step"])
        self.started = time.perf_counter() - self.state.get("elapsed_s", 0.0)
        if self.state["step"] == 0 and self.state["best_metric"] < 0:
            self.state["best_metric"] = self.validate(self.best)
            log_record(self.log_path, self.state, {"step": 0, "valid_accuracy": self.state["best_metric"],
                                                   "elapsed_s": 0.0})
            if distributed.is_main():
                self.method.keep_best(self.best, self.summary())

    def validate(self, trained: dict) -> float:
        return validation_metric(self.model, self.task_tokenizer, self.valid_items, self.method.cache(trained),
                                 self.task)

    def loop(self, show_progress: bool) -> None:
        running_loss, running_count = 0.0, 0
        with training_progress(show_progress and distributed.is_main()) as progress:
            bar = progress.add_task(status_text(self.state, None), total=self.config.steps,
                                    completed=self.state["step"])
            while self.state["step"] < self.config.steps:
                running_loss, running_count = running_loss + self.step(), running_count + 1
                progress.update(bar, advance=1, description=status_text(self.state, running_loss / running_count))
                if self.state["step"] % self.config.eval_every == 0 or self.state["step"] == self.config.steps:
                    self.evaluate(running_loss / running_count)
                    running_loss, running_count = 0.0, 0
                    progress.update(bar, description=status_text(self.state, None))
                    if self.config.patience and self.state["bad_evals"] >= self.config.patience:
                        self.stopped_early = True
                        break

    def step(self) -> float:
        """One optimizer step on this step's batch (this process's shard of it); returns the global batch loss."""
        indices = batch_for_step(self.train_items, self.config, self.state["step"])
        local = distributed.shard(indices)  # all of it in a single process
        checkpointing = self.config.activation_checkpointing
        # Scaled so that the gradients summed over processes are the gradient of the global batch mean.
        with self.model.activation_checkpointing() if checkpointing else contextlib.nullcontext():
            inputs = {**self.method.inputs(), **({"route": Route.CONCAT} if self.config.route == "concat" else {})}
            loss = prompt_loss(self.model, self.task_tokenizer, [self.train_items[i] for i in local], inputs,
                               self.config.objective) * (len(local) / len(indices))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        for parameter in self.parameters:
            distributed.all_reduce_sum(parameter.grad)
        loss = distributed.all_reduce_sum(loss.detach())
        check_finite(loss, self.state["step"], self.model.precision)
        self.scaler.step(self.optimizer)  # fp16: skipped while the scaled gradient overflows, as the scale settles
        self.scaler.update()
        self.scheduler.step()
        self.state["step"] += 1
        return loss.item()

    def evaluate(self, loss: float) -> None:
        """Validate, keep the best, log, checkpoint."""
        current = self.method.current()
        metric = self.validate(current)
        state = self.state
        if metric > state["best_metric"]:
            state.update(best_metric=metric, best_step=state["step"], bad_evals=0)
            self.best = current
            if distributed.is_main():
                self.method.keep_best(current, self.summary())
        else:
            state["bad_evals"] += 1
        state["elapsed_s"] = time.perf_counter() - self.started
        log_record(self.log_path, state, {"step": state["step"], "loss": loss, "valid_accuracy": metric,
                                          "elapsed_s": round(state["elapsed_s"], 2)})
        if distributed.is_main() and self.method.resumable:
            _save_checkpoint(self.checkpoint_path, self.method.trainable, self.best, self.optimizer, self.scaler,
                             state, self.config, self.data_fingerprint)

    def summary(self) -> dict:
        """What the saved result records about its training."""
        return {"config": asdict(self.config), "steps_run": self.state["step"], "best_step": self.state["best_step"],
                "best_valid_accuracy": self.state["best_metric"], "valid_examples": len(self.valid_items),
                "train_examples": len(self.train_items), "stopped_early": self.stopped_early,
                "elapsed_s": round(time.perf_counter() - self.started, 1)}

    def finish(self) -> TrainResult:
        summary = self.summary()
        # what trained is done with: free it before the result is built (model tuning loads its best copy back)
        del self.optimizer, self.scheduler, self.parameters
        self.model = None
        saved = self.method.result(self.best, summary, self.out)
        prompt = saved if isinstance(saved, SoftPrompt) else None
        if distributed.is_main() and prompt is not None:
            prompt.save(self.out)
            self.checkpoint_path.unlink(missing_ok=True)
        return TrainResult(prompt, self.state["best_metric"], self.state["best_step"], self.state["step"],
                           self.stopped_early, self.state["history"], None if prompt is not None else saved)


def check_finite(loss: torch.Tensor, step: int, precision: str) -> None:
    if not torch.isfinite(loss):
        hint = ("; fp16 activations overflow in some models (Gemma among them): try --precision bf16 or fp32"
                if precision == "fp16" else "")
        raise SoftPromptError(f"the training loss is {loss.item()} at step {step + 1}: try a lower --lr{hint}")


def training_progress(show: bool) -> Progress:
    columns = [TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, disable=not show, transient=False)


def status_text(state: dict, loss: float | None) -> str:
    loss_text = f"loss {loss:.3f}  " if loss is not None else ""
    return f"{loss_text}best valid acc {state['best_metric']:.3f} @ {state['best_step']}"


def log_record(path: Path, state: dict, record: dict) -> None:
    state["history"].append(record)
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


# what a resumed run may change: how it runs, not what it computes
RESUME_MAY_CHANGE = {"compile", "compile_mode", "activation_checkpointing"}
# what it can never change, even when told to go on anyway: the shapes of what trains and of the optimizer state
RESUME_SHAPES = {"prompt_length", "optimizer", "method", "reparameterize"}


def check_resumable(path: Path, saved: dict, asked: dict, anyway: bool) -> None:
    """Refuse to continue a checkpointed run with other settings or data, naming each difference; with `anyway`,
    only differences of shape are refused."""
    changed = sorted(key for key in asked if key not in RESUME_MAY_CHANGE and saved.get(key) != asked[key])
    refused = [key for key in changed if key in RESUME_SHAPES or not anyway]
    if refused:
        differences = "; ".join(f"{key}: {saved.get(key)!r} then, {asked[key]!r} now" for key in refused)
        hint = "" if set(refused) & RESUME_SHAPES else " (--resume-anyway continues with the new ones)"
        raise SoftPromptError(f"checkpoint {path} was made with other settings or data: {differences}{hint}")


def data_fingerprint(train_examples: list[Example], valid_examples: list[Example]) -> str:
    """Identifies the training and validation examples (fields, label, target) a checkpoint was made with."""
    digest = hashlib.sha256()
    for example in [*train_examples, None, *valid_examples]:
        row = None if example is None else [example.fields, example.label, example.target]
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _save_checkpoint(path: Path, trainable: torch.nn.Module, best: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, state: dict,
                     config: TrainConfig, data: str) -> None:
    """Everything needed to continue: what trains, the best prompt, optimizer state, the fp16 loss scale and its
    growth counter (a fresh scale would skip other steps), counters (safetensors, no pickle). Optimizer tensors
    are stored as `optimizer.<parameter index>.<name>`."""
    tensors = {f"trainable.{key}": value.detach().cpu().contiguous() for key, value in trainable.state_dict().items()}
    tensors.update({f"best.{name}": tensor.cpu().contiguous() for name, tensor in best.items()})
    scalars: dict[str, dict] = {}
    for index, parameter_state in optimizer.state_dict()["state"].items():
        for key, value in parameter_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {"state": json.dumps(state), "optimizer_scalars": json.dumps(scalars),
                "loss_scaler": json.dumps(scaler.state_dict()), "config": json.dumps(asdict(config)), "data": data}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_checkpoint(path: Path, trainable: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, config: TrainConfig, data: str,
                     anyway: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    check_resumable(path, {**json.loads(metadata["config"]), "data": metadata.get("data")},
                    {**asdict(config), "data": data}, anyway)
    device = next(trainable.parameters()).device
    trainable.load_state_dict({key[len("trainable."):]: value.to(device) for key, value in tensors.items()
                               if key.startswith("trainable.")})
    optimizer_state = {int(index): values for index, values in json.loads(metadata["optimizer_scalars"]).items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            index, name = key[len("optimizer."):].split(".", 1)
            optimizer_state.setdefault(int(index), {})[name] = value.to(device)
    full = optimizer.state_dict()
    full["state"] = optimizer_state
    optimizer.load_state_dict(full)
    scaler_state = json.loads(metadata.get("loss_scaler", "{}"))  # empty: fp32/bf16, or a checkpoint from before
    if scaler.is_enabled() and scaler_state:
        scaler.load_state_dict(scaler_state)
    best = {key[len("best."):]: value.to(device) for key, value in tensors.items() if key.startswith("best.")}
    if not best:
        raise SoftPromptError(f"checkpoint {path} was written by an older softprompt (no 'best.prompt' tensor): "
                              "start the run again without --resume")
    return json.loads(metadata["state"]), best


def record_test_results(prompt: SoftPrompt, out: str | Path, test_accuracy: float,
                        zero_shot_accuracy: float | None = None) -> Path:
    """Add the trained prompt's test accuracy (and the hand-written template's, when it was scored) to its
    `training` record, and save it to `out` again (atomically)."""
    prompt.training["test_accuracy"] = test_accuracy
    if zero_shot_accuracy is not None:
        prompt.training["zero_shot_test_accuracy"] = zero_shot_accuracy
    return prompt.save(out)
