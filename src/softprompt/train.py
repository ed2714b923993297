"""The prompt-tuning recipe: only the [K, d] prompt trains; the backbone stays frozen.

Validation every `eval_every` steps keeps the best prompt; `patience` evaluations without improvement stop early.
A checkpoint next to the output (`<out>.ckpt.safetensors`) lets `resume=True` continue an interrupted run exactly:
the data order is a pure function of (seed, step). Metrics are appended to `<out>.log.jsonl`.
"""

from __future__ import annotations

import contextlib
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
from .backbone import Backbone
from .config import DEFAULT_LR, MODEL_TUNING_LR, TrainConfig  # noqa: F401 (the LRs: re-exported)
from .data import Encoded, Encoder, Example
from .errors import SoftPromptError
from .evaluate import generate_texts, label_scores, sum_label_tokens
from .files import write_atomically
from .initializers import initialize
from .prompt import SoftPrompt, prefix_cache, prefix_from_embeddings
from .tasks import TaskSpec
from .trainable import materialize, parameter_count, trainable_prompt


@dataclass
class TrainResult:
    prompt: SoftPrompt
    best_metric: float
    best_step: int
    steps_run: int
    stopped_early: bool
    history: list[dict]


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


def batch_order(items: list[Encoded], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
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


def batch_for_step(items: list[Encoded], config: TrainConfig, step: int) -> list[int]:
    # batch_order keeps only full batches (windows are whole multiples of the batch size), or the one partial
    # batch when there are fewer items than a batch: the count follows without building an order.
    per_epoch = max(1, len(items) // config.batch_size)
    return batch_order(items, config.batch_size, config.seed, step // per_epoch)[step % per_epoch]


def prompt_loss(backbone: Backbone, encoder: Encoder, items: list[Encoded], prompt: torch.Tensor | None,
                path: str = "cached", objective: str = "rank", method: str = "prompt") -> torch.Tensor:
    """Loss on the label tokens only, mean over examples (`prompt` None: the template alone, for model tuning).

    "lm": negative log-likelihood of the gold label's tokens over the whole vocabulary (the paper's objective).
    "rank": cross-entropy over the labels' summed log-probs, i.e. exactly what rank classification decides on.
    """
    if method == "prompt" or prompt is None:
        inputs = {"prompts": None if prompt is None else prompt.unsqueeze(0), "path": path}
    else:  # deep prompts are keys/values already: there is nothing to concatenate
        inputs = {"prompt_kv": prefix_cache(backbone, prompt, method)}
    if objective == "lm":
        batch = encoder.training_batch(items)
        return -backbone.target_logprobs(batch, **inputs).sum() / len(items)
    batch, groups = encoder.scoring_batch(items)
    logprobs = backbone.target_logprobs(batch, **inputs)
    scores = sum_label_tokens(logprobs, groups, len(items), len(encoder.label_ids))
    gold = torch.tensor([item.label for item in items], device=scores.device)
    return torch.nn.functional.cross_entropy(scores, gold)


@torch.no_grad()
def validation_metric(backbone: Backbone, encoder: Encoder, items: list[Encoded], prompt: torch.Tensor | None,
                      task: TaskSpec, method: str = "prompt") -> float:
    """Accuracy (classification) or exact match of greedy decoding (generation); `prompt` None: no prompt.
    Under torch.distributed each process scores its shard and the counts are summed."""
    total = len(items)
    items = distributed.shard(items)
    if prompt is None:
        prefix = backbone.prompt_key_values(backbone.zero_shot_prompts(task))
    else:
        prefix = prefix_cache(backbone, prompt.detach(), method)
    correct = 0
    if items and not task.is_classification:
        outputs = generate_texts(backbone, encoder, items, prefix, max_new_tokens=16)
        targets = [backbone.tokenizer.decode(item.target_ids, skip_special_tokens=True) for item in items]
        correct = sum(out.strip() == target.strip() for out, target in zip(outputs, targets))
    elif items:
        predicted = label_scores(backbone, encoder, items, prompt_kv=prefix).argmax(1).tolist()
        correct = sum(p == item.label for p, item in zip(predicted, items))
    return distributed.all_reduce_sum(torch.tensor(float(correct), device=backbone.device)).item() / total


def train(
    backbone: Backbone,
    task: TaskSpec,
    train_examples: list[Example],
    valid_examples: list[Example],
    out: str | Path,
    config: TrainConfig | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train a soft prompt; the best one (by validation accuracy) is saved to `out` and returned."""
    config = config or TrainConfig()
    if not task.is_classification and config.objective == "rank":
        config = replace(config, objective="lm")  # nothing to rank: learn the target text itself
    if not train_examples:
        raise SoftPromptError("the training set is empty")
    if config.batch_size < distributed.world_size():
        raise SoftPromptError(f"batch size {config.batch_size} is smaller than the {distributed.world_size()} "
                              "processes it is split across")
    main_process = distributed.is_main()  # only it writes files and shows progress
    out = Path(out)
    checkpoint_path = out.with_name(out.name + ".ckpt.safetensors")
    log_path = out.with_name(out.name + ".log.jsonl")
    torch.manual_seed(config.seed)
    encoder = Encoder(backbone, task, config.max_input_tokens)
    train_items = encoder.encode_all(train_examples)
    valid_items = encoder.encode_all(valid_examples[: config.valid_limit] if config.valid_limit else valid_examples)
    if not valid_items:
        raise SoftPromptError("the validation set is empty")

    embeddings = initialize(config.init, backbone, config.prompt_length, task, config.seed).to(backbone.device)
    initial = embeddings
    if config.method == "prefix":
        initial = prefix_from_embeddings(backbone, embeddings)
    elif config.method == "model-tuning":
        raise SoftPromptError("model tuning trains the model, not a prompt: use model_tuning.tune_model")
    if config.activation_checkpointing and config.method == "prefix":
        # checkpointed layers drop a cache object, the only other way deep prompts reach attention
        backbone.require_plain_prefix("--activation-checkpointing with --method prefix")
    if config.compile or config.compile_mode:
        backbone.compile(config.compile_mode)
    if backbone.is_encoder_only:  # the label head trains with the prompt, as rows after it (encoder_model.py)
        initial = torch.cat([embeddings, backbone.label_head(task)])
    trainable = trainable_prompt(initial, embeddings, config.reparameterize).to(backbone.device)
    parameters = list(trainable.parameters())
    optimizer = make_optimizer(config, parameters)
    state = {"step": 0, "best_metric": -1.0, "best_step": 0, "bad_evals": 0, "history": []}
    best = initial.clone()
    scaler = backbone.loss_scaler()
    if resume and checkpoint_path.exists():
        state, best = _load_checkpoint(checkpoint_path, trainable, optimizer, scaler, config)
    elif resume:
        raise SoftPromptError(f"--resume: no checkpoint at {checkpoint_path}")
    elif log_path.exists() and main_process:
        log_path.unlink()  # a fresh run starts a fresh log
    scheduler = make_schedule(config, optimizer, start_step=state["step"])

    if state["step"] == 0 and state["best_metric"] < 0:
        state["best_metric"] = validation_metric(backbone, encoder, valid_items, materialize(trainable), task,
                                                 config.method)
        log_record(log_path, state, {"step": 0, "valid_accuracy": state["best_metric"], "elapsed_s": 0.0})

    started = time.perf_counter() - state.get("elapsed_s", 0.0)
    running_loss, running_count = 0.0, 0
    stopped_early = False
    with training_progress(show_progress and main_process) as progress:
        bar = progress.add_task(status_text(state, None), total=config.steps, completed=state["step"])
        while state["step"] < config.steps:
            indices = batch_for_step(train_items, config, state["step"])
            local = distributed.shard(indices)  # all of it in a single process
            # Scaled so that the gradients summed over processes are the gradient of the global batch mean.
            with backbone.activation_checkpointing() if config.activation_checkpointing else contextlib.nullcontext():
                route = "cached" if config.route == "auto" else config.route
                loss = prompt_loss(backbone, encoder, [train_items[i] for i in local], trainable(), route,
                                   config.objective, config.method) * (len(local) / len(indices))
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            for parameter in parameters:
                distributed.all_reduce_sum(parameter.grad)
            loss = distributed.all_reduce_sum(loss.detach())
            check_finite(loss, state["step"], backbone.precision)
            scaler.step(optimizer)  # fp16: skipped while the scaled gradient overflows, as the scale settles
            scaler.update()
            scheduler.step()
            state["step"] += 1
            running_loss += loss.item()
            running_count += 1
            progress.update(bar, advance=1, description=status_text(state, running_loss / running_count))
            if state["step"] % config.eval_every == 0 or state["step"] == config.steps:
                current = materialize(trainable)
                metric = validation_metric(backbone, encoder, valid_items, current, task, config.method)
                if metric > state["best_metric"]:
                    state.update(best_metric=metric, best_step=state["step"], bad_evals=0)
                    best = current
                else:
                    state["bad_evals"] += 1
                state["elapsed_s"] = time.perf_counter() - started
                log_record(log_path, state, {"step": state["step"], "loss": running_loss / running_count,
                                       "valid_accuracy": metric, "elapsed_s": round(state["elapsed_s"], 2)})
                running_loss, running_count = 0.0, 0
                if main_process:
                    _save_checkpoint(checkpoint_path, trainable, best, optimizer, scaler, state, config)
                progress.update(bar, description=status_text(state, None))
                if config.patience and state["bad_evals"] >= config.patience:
                    stopped_early = True
                    break

    best = best.cpu()
    result_prompt = SoftPrompt(
        embeddings=best[: config.prompt_length] if config.method == "prompt" else None,
        prefix=best if config.method == "prefix" else None,
        head=best[config.prompt_length :] if backbone.is_encoder_only else None,
        base_model=backbone.name,
        fingerprint=backbone.fingerprint,
        task=task,
        init=config.init,
        training={
            "config": asdict(config),
            "steps_run": state["step"],
            "best_step": state["best_step"],
            "best_valid_accuracy": state["best_metric"],
            "valid_examples": len(valid_items),
            "train_examples": len(train_items),
            "stopped_early": stopped_early,
            "trainable_parameters": parameter_count(trainable),
            "elapsed_s": round(time.perf_counter() - started, 1),
        },
    )
    if main_process:
        result_prompt.save(out)
        checkpoint_path.unlink(missing_ok=True)
    return TrainResult(result_prompt, state["best_metric"], state["best_step"], state["step"], stopped_early,
                       state["history"])


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


def _save_checkpoint(path: Path, trainable: torch.nn.Module, best: torch.Tensor, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, state: dict, config: TrainConfig) -> None:
    """Everything needed to continue: what trains, the best prompt, optimizer state, the fp16 loss scale and its
    growth counter (a fresh scale would skip other steps), counters (safetensors, no pickle). Optimizer tensors
    are stored as `optimizer.<parameter index>.<name>`."""
    tensors = {f"trainable.{key}": value.detach().cpu().contiguous() for key, value in trainable.state_dict().items()}
    tensors["best"] = best.cpu().contiguous()
    scalars: dict[str, dict] = {}
    for index, parameter_state in optimizer.state_dict()["state"].items():
        for key, value in parameter_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {"state": json.dumps(state), "optimizer_scalars": json.dumps(scalars),
                "loss_scaler": json.dumps(scaler.state_dict()), "config": json.dumps(asdict(config))}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_checkpoint(path: Path, trainable: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, config: TrainConfig) -> tuple[dict, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    saved = json.loads(metadata["config"])
    fixed = ("prompt_length", "optimizer", "method", "reparameterize")
    if any(saved.get(key, getattr(TrainConfig, key)) != getattr(config, key) for key in fixed):
        asked = {key: getattr(config, key) for key in fixed}
        raise SoftPromptError(f"checkpoint {path} was made with {({key: saved.get(key) for key in fixed})}; "
                              f"this run asks for {asked}")
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
    return json.loads(metadata["state"]), tensors["best"].to(device)


def record_test_results(prompt: SoftPrompt, out: str | Path, test_accuracy: float,
                        zero_shot_accuracy: float | None = None) -> Path:
    """Add the trained prompt's test accuracy (and the hand-written template's, when it was scored) to its
    `training` record, and save it to `out` again (atomically)."""
    prompt.training["test_accuracy"] = test_accuracy
    if zero_shot_accuracy is not None:
        prompt.training["zero_shot_test_accuracy"] = zero_shot_accuracy
    return prompt.save(out)
