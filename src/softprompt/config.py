"""TrainConfig: every training setting with its default and help, checked once when the config is built.

The `softprompt train` options are generated from these fields (cli.config_options), so errors name each field
as the command line spells it: `--name-in-kebab-case`, or the field's metadata "flag".
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields

from .backbone import COMPILE_MODES
from .errors import SoftPromptError

DEFAULT_LR = {"adamw": 0.01, "adafactor": 0.3}  # adafactor: the paper preset (see README, "Defaults")
MODEL_TUNING_LR = {"adamw": 2e-5, "adafactor": 1e-4}  # every weight trains: steps must be far smaller

CHOICES = {
    "optimizer": tuple(DEFAULT_LR),
    "schedule": ("linear", "constant"),
    "method": ("prompt", "prefix", "model-tuning"),
    "objective": ("rank", "lm"),
    "route": ("auto", "concat"),
    "compile_mode": COMPILE_MODES,
}
AT_LEAST = {"batch_size": 1, "steps": 1, "eval_every": 1, "max_input_tokens": 1, "patience": 0, "reparameterize": 0}


def cli_flag(option: Field) -> str:
    """How the command line spells a config field."""
    return option.metadata.get("flag", "--" + option.name.replace("_", "-"))


@dataclass(frozen=True)
class TrainConfig:
    prompt_length: int = field(default=20, metadata={"help": "Number of virtual tokens K."})
    init: str = field(default="class-label", metadata={"help": 'class-label | vocab | uniform | text:"..."'})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adafactor (paper preset)."})
    lr: float | None = field(default=None, metadata={"help": (
        f"Learning rate. Default: {DEFAULT_LR['adamw']} for adamw, {DEFAULT_LR['adafactor']} for adafactor "
        f"(model-tuning: {MODEL_TUNING_LR['adamw']}, {MODEL_TUNING_LR['adafactor']}).")})
    weight_decay: float = field(default=1e-5, metadata={"help": "The optimizer's weight decay."})
    batch_size: int = field(default=16, metadata={"help": "Examples per step (split across --devices)."})
    steps: int = field(default=200, metadata={"help": "Training steps."})
    eval_every: int = field(default=25, metadata={"help": "Steps between validation evaluations."})
    patience: int = field(default=4, metadata={"help": "Evals without gain before stopping (0: off)."})
    valid_limit: int | None = field(default=300, metadata={
        "help": "Validation examples per eval (0: all; None in Python).", "cli_none": 0})
    max_input_tokens: int = field(default=256, metadata={
        "help": "Max input tokens (longer: cut, template tail kept).", "flag": "--max-length"})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt's init and the data order."})
    route: str = field(default="auto", metadata={
        "help": "auto (the model picks the fastest exact route) | concat (the reference route)."})
    schedule: str = field(default="linear", metadata={"help": "linear (decay to 0) | constant."})
    method: str = field(default="prompt", metadata={"help": (
        "prompt (input embeddings) | prefix (keys/values at every layer) | model-tuning (baseline: all "
        "weights train; --out is a directory).")})
    objective: str = field(default="rank", metadata={"help": "rank (CE over labels) | lm (paper)."})
    reparameterize: int = field(default=0, metadata={
        "help": "--method prefix: train through a tanh MLP of this hidden width (prefix-tuning); 0: off."})
    activation_checkpointing: bool = field(default=False, metadata={"help": (
        "Recompute layer activations in the backward pass (less memory, more time; deep prompts too on "
        "Llama, Qwen2, Gemma3).")})
    compile: bool = field(default=False, metadata={"help": (
        "torch.compile the decoder layers (one graph shared by all layers; the first step compiles; speed-ups "
        "in docs/benchmarks.md). Llama, Qwen2, Gemma3.")})
    compile_mode: str | None = field(default=None, metadata={"help": (
        "torch.compile's mode (implies --compile): reduce-overhead replays each layer as a CUDA graph, the "
        "fastest step on a GPU (docs/benchmarks.md); default, max-autotune.")})

    def __post_init__(self) -> None:
        # Checked once here, so training never meets a bad value mid-run (or per step).
        options = {option.name: option for option in fields(self)}
        flag = {name: cli_flag(option) for name, option in options.items()}
        for name, choices in CHOICES.items():
            _check_choice(options[name], getattr(self, name), choices)
        for name, least in AT_LEAST.items():
            if getattr(self, name) < least:
                raise SoftPromptError(f"{flag[name]} must be >= {least}, got {getattr(self, name)}")
        least = 0 if self.method == "model-tuning" else 1  # model tuning trains no prompt (sweep.py gives it 0)
        if self.prompt_length < least:
            raise SoftPromptError(f"{flag['prompt_length']} must be >= {least}, got {self.prompt_length}")
        if self.valid_limit == 0:
            object.__setattr__(self, "valid_limit", None)  # 0 means all, on the command line as in Python
        if self.valid_limit is not None and self.valid_limit < 1:
            raise SoftPromptError(f"{flag['valid_limit']} must be >= 1, or 0 for all, got {self.valid_limit}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SoftPromptError(f"{flag['lr']} must be finite and > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SoftPromptError(f"{flag['weight_decay']} must be finite and >= 0, got {self.weight_decay}")
        if self.reparameterize and self.method != "prefix":
            raise SoftPromptError(f"{flag['reparameterize']} applies to deep prompts ({flag['method']} prefix) only, "
                                  f"not {flag['method']} {self.method}")
        if self.method == "model-tuning" and (self.compile or self.compile_mode):
            raise SoftPromptError(f"{flag['compile']} compiles the frozen layers for the packed prompt pass; "
                                  f"{flag['method']} model-tuning trains every weight and does not use it")
        if self.method == "prefix" and self.route == "concat":
            raise SoftPromptError(f"{flag['route']} concat puts prompt embeddings in front of the tokens; deep "
                                  f"prompts ({flag['method']} prefix) are keys/values at every layer")
        if not isinstance(self.init, str) or not self.init.strip():
            raise SoftPromptError(f"{flag['init']} must be a non-empty string, got {self.init!r}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return (MODEL_TUNING_LR if self.method == "model-tuning" else DEFAULT_LR)[self.optimizer]


def _check_choice(option: Field, value: object, choices: tuple) -> None:
    if value in choices:
        return
    named = ", ".join(choice for choice in choices if choice is not None)
    unset = " (or None)" if None in choices else ""
    raise SoftPromptError(f"{cli_flag(option)}: unknown {option.name.replace('_', ' ')} {value!r}; "
                          f"choose {named}{unset}")
