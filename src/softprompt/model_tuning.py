"""The model-tuning baseline: every weight of the model trains, in the same loop, on the same data, loss and
schedule as a prompt (train.py).

This is the paper's point of comparison (its Figure 1: the gap between prompt tuning and model tuning closes as
models grow). The caller's frozen backbone is left untouched: a copy trains. The best copy by validation accuracy
is saved as a normal Hugging Face checkpoint directory (weights + tokenizer + `softprompt-training.json`), which
`--model DIR` loads like any other model. No resume: a run is a few hundred steps.
"""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path

import torch

from .backbone import Backbone, PromptCache
from .errors import SoftPromptError
from .files import write_directory_atomically
from .loader import load_model
from .tasks import TaskSpec

TRAINING_FILE = "softprompt-training.json"


class ModelTuning:
    """Method "model-tuning": every weight of a copy of the model trains; the best copy is written to `out` as a
    Hugging Face checkpoint directory whenever validation improves (a model is too big to keep a second copy)."""

    resumable = False

    def __init__(self, backbone: Backbone, task: TaskSpec, config, out: Path):
        backbone.require("language_model_head", "model tuning")
        if out.exists() and not out.is_dir():
            raise SoftPromptError(f"model tuning saves a checkpoint directory; {out} is a file")
        check_memory(backbone)
        self.base, self.task, self.config, self.out = backbone, task, config, out
        # fp32 weights to train, the head tied again (a half-precision load stores frozen linear weights in half)
        model = copy.deepcopy(backbone.model).float()
        model.tie_weights()
        self.model = type(backbone)(model, backbone.tokenizer, backbone.name, backbone.precision)
        model.requires_grad_(True)  # the kind froze the copy; here every weight is a parameter to train

    def parameters(self) -> list[torch.Tensor]:
        return list(self.model.model.parameters())

    def inputs(self) -> dict:
        return {}  # the template alone: the weights are what trains

    def current(self) -> dict:
        return {}  # the weights stay in the model; `keep_best` writes them out

    def cache(self, trained: dict) -> PromptCache:
        return self.model.zero_shot_cache(self.task)

    def keep_best(self, trained: dict, summary: dict) -> None:
        record = {"base_model": self.base.name, "task": self.task.to_dict(), **summary}

        def write(directory: Path) -> None:
            self.model.model.save_pretrained(directory)
            self.base.tokenizer.save_pretrained(directory)
            (directory / TRAINING_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")

        write_directory_atomically(self.out, write)

    def result(self, best: dict, summary: dict, out: Path) -> Backbone:
        """The best tuned model, loaded back from `out` (the training copy and its optimizer are gone by then)."""
        self.model = None
        gc.collect()  # the copy's weights, gradients and optimizer state go before the best copy comes back
        return load_model(str(out), self.base.precision)


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
