"""SoftPrompt: the learned [K, d] matrix plus what it is for, stored as one self-describing safetensors file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .errors import SoftPromptError
from .files import write_atomically
from .tasks import TaskSpec

FORMAT = "softprompt/1"


@dataclass
class SoftPrompt:
    embeddings: torch.Tensor  # [K, d], float32
    base_model: str
    fingerprint: str
    task: TaskSpec
    init: str = "class-label"
    training: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "task": self.task.to_dict(),
            "init": self.init,
            "length": self.length,
            "d_model": self.embeddings.shape[1],
            "training": self.training,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically: an interrupted save leaves the previous file intact."""
        tensor = self.embeddings.detach().float().cpu().contiguous()
        header = {"format": FORMAT, "softprompt": json.dumps(self.metadata())}
        return write_atomically(path, lambda tmp: save_file({"prompt": tensor}, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> SoftPrompt:
        path = Path(path)
        if not path.is_file():
            raise SoftPromptError(f"prompt file {path} does not exist")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise SoftPromptError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") \
                from None
        if header.get("format") != FORMAT or "prompt" not in tensors:
            raise SoftPromptError(
                f"{path} is a safetensors file but not a softprompt prompt file (format {header.get('format')!r}, "
                f"expected {FORMAT!r} with a 'prompt' tensor)"
            )
        meta = json.loads(header["softprompt"])
        embeddings = tensors["prompt"]
        if embeddings.ndim != 2:
            raise SoftPromptError(f"{path}: prompt tensor must be [K, d], found shape {list(embeddings.shape)}")
        return cls(
            embeddings=embeddings,
            base_model=meta["base_model"],
            fingerprint=meta["fingerprint"],
            task=TaskSpec.from_dict(meta["task"]),
            init=meta.get("init", "unknown"),
            training=meta.get("training", {}),
        )

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse to run on a model other than the one the prompt was trained on."""
        if self.embeddings.shape[1] != backbone.d_model:
            raise SoftPromptError(
                f"prompt was trained on {self.base_model!r} (d={self.embeddings.shape[1]}) but the loaded model "
                f"{backbone.name!r} has d={backbone.d_model}"
            )
        if self.fingerprint != backbone.fingerprint:
            raise SoftPromptError(
                f"prompt was trained on {self.base_model!r} (fingerprint {self.fingerprint}) but the loaded model is "
                f"{backbone.name!r} (fingerprint {backbone.fingerprint}); load the prompt with --model "
                f"{self.base_model}"
            )
