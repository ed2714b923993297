"""SoftPrompt: the learned [K, d] matrix plus what it is for, stored as one self-describing safetensors file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone, PromptCache
from .errors import SoftPromptError
from .files import write_atomically
from .tasks import TaskSpec

FORMAT = "softprompt/1"


def prompt_cache(backbone: Backbone, method: str, tensor: torch.Tensor,
                 label_head: torch.Tensor | None = None) -> PromptCache:
    """What runs start from for one prompt: the model run over its input embeddings ("prompt"), or learned
    per-layer keys/values as they are ("prefix"); an encoder classifier's label head travels with it.
    Differentiable, so training uses it too."""
    if method == "prefix":
        backbone.require("deep_prompts", "a deep prompt (--method prefix)")
        return backbone.deep_prompt_cache(tensor.unsqueeze(0))
    return backbone.prompt_cache(tensor.unsqueeze(0), None if label_head is None else label_head.unsqueeze(0))


def scoring_inputs(backbone: Backbone, method: str, tensor: torch.Tensor,
                   label_head: torch.Tensor | None = None) -> dict:
    """`target_logprobs` keyword arguments for one prompt being trained: the prompt tensor itself where the model
    runs it with the tokens (a causal LM packs them into one pass), else its cache."""
    if method == "prompt" and label_head is None:
        return {"prompts": tensor.unsqueeze(0)}
    return {"cache": prompt_cache(backbone, method, tensor, label_head)}


@dataclass
class SoftPrompt:
    """Method "prompt": `embeddings` [K, d] in front of the input (Lester et al.). Method "prefix" (deep prompts,
    prefix-tuning / P-tuning v2): `key_values` [layers, 2, kv_heads, K, head_dim], learned keys/values at every
    layer. An encoder classifier's prompt also has its `label_head` [labels, d] (encoder_classifier.py)."""

    embeddings: torch.Tensor | None  # [K, d], float32
    base_model: str
    fingerprint: str
    task: TaskSpec
    init: str = "class-label"
    training: dict = field(default_factory=dict)
    key_values: torch.Tensor | None = None
    label_head: torch.Tensor | None = None

    @property
    def method(self) -> str:
        return "prefix" if self.key_values is not None else "prompt"

    @property
    def length(self) -> int:
        return self.key_values.shape[3] if self.key_values is not None else self.embeddings.shape[0]

    @property
    def tensor(self) -> torch.Tensor:
        """The trained tensor, whichever the method."""
        return self.key_values if self.key_values is not None else self.embeddings

    def cache(self, backbone: Backbone) -> PromptCache:
        """What runs with this prompt on `backbone` start from, ready for `target_logprobs(cache=...)`."""
        head = None if self.label_head is None else self.label_head.to(backbone.device)
        return prompt_cache(backbone, self.method, self.tensor.to(backbone.device), head)

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "task": self.task.to_dict(),
            "init": self.init,
            "method": self.method,
            "length": self.length,
            "shape": list(self.tensor.shape),
            "training": self.training,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically: an interrupted save leaves the previous file intact."""
        tensor = self.tensor.detach().float().cpu().contiguous()
        header = {"format": FORMAT, "softprompt": json.dumps(self.metadata())}
        tensors = {self.method: tensor}  # the tensor is named after the method: "prompt" or "prefix"
        if self.label_head is not None:
            tensors["head"] = self.label_head.detach().float().cpu().contiguous()
        return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @staticmethod
    def read_metadata(path: str | Path) -> dict | None:
        """The JSON header of a prompt file without reading its tensors; None if it is not a readable prompt file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            return json.loads(header["softprompt"]) if header.get("format") == FORMAT else None
        except (SafetensorError, OSError, ValueError, KeyError):
            return None

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
        if header.get("format") != FORMAT or not ({"prompt", "prefix"} & set(tensors)):
            raise SoftPromptError(
                f"{path} is a safetensors file but not a softprompt prompt file (format {header.get('format')!r}, "
                f"expected {FORMAT!r} with a 'prompt' or 'prefix' tensor)"
            )
        meta = json.loads(header["softprompt"])
        embeddings, key_values = tensors.get("prompt"), tensors.get("prefix")
        if embeddings is not None and embeddings.ndim != 2:
            raise SoftPromptError(f"{path}: prompt tensor must be [K, d], found shape {list(embeddings.shape)}")
        if key_values is not None and (key_values.ndim != 5 or key_values.shape[1] != 2):
            raise SoftPromptError(f"{path}: prefix tensor must be [layers, 2, kv_heads, K, head_dim], found shape "
                                  f"{list(key_values.shape)}")
        head = tensors.get("head")
        labels = TaskSpec.from_dict(meta["task"]).labels
        if head is not None and (embeddings is None or head.ndim != 2 or labels is None
                                 or list(head.shape) != [len(labels), embeddings.shape[1]]):
            raise SoftPromptError(f"{path}: head tensor must be [labels, d] = {[len(labels or []), '<d>']}, found "
                                  f"shape {list(head.shape)}")
        return cls(
            embeddings=embeddings,
            key_values=key_values,
            label_head=head,
            base_model=meta["base_model"],
            fingerprint=meta["fingerprint"],
            task=TaskSpec.from_dict(meta["task"]),
            init=meta.get("init", "unknown"),
            training=meta.get("training", {}),
        )

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse to run on a model other than the one the prompt was trained on."""
        if self.key_values is not None:
            backbone.require("deep_prompts", f"the deep prompt trained on {self.base_model!r}")
            expected = backbone.deep_prompt_shape(self.length)
            if list(self.key_values.shape) != expected:
                raise SoftPromptError(f"prefix prompt trained on {self.base_model!r} has shape "
                                      f"{list(self.key_values.shape)}; {backbone.name!r} needs {expected}")
        elif self.embeddings.shape[1] != backbone.d_model:
            raise SoftPromptError(
                f"prompt was trained on {self.base_model!r} (d={self.embeddings.shape[1]}) but the loaded model "
                f"{backbone.name!r} has d={backbone.d_model}"
            )
        if (self.label_head is not None) != backbone.scores_with_label_head:
            trained_on = "an encoder classifier, with a label head" if self.label_head is not None else "an LM"
            raise SoftPromptError(f"prompt was trained on {self.base_model!r} ({trained_on}); {backbone.name!r} is "
                                  f"{backbone.kind}")
        if self.fingerprint != backbone.fingerprint:
            raise SoftPromptError(
                f"prompt was trained on {self.base_model!r} (fingerprint {self.fingerprint}) but the loaded model is "
                f"{backbone.name!r} (fingerprint {backbone.fingerprint}); load the prompt with --model "
                f"{self.base_model}"
            )


def prompt_files(directory: str | Path) -> list[Path]:
    """The prompt files of a directory, sorted: `*.safetensors` except training checkpoints (`*.ckpt.safetensors`)."""
    return sorted(path for path in Path(directory).glob("*.safetensors")
                  if not path.name.endswith(".ckpt.safetensors"))


def base_model_of(directory: str | Path) -> str:
    """The one base model the prompts in `directory` were trained on, read from their headers only (no tensors);
    files that are not prompts are skipped here, as whoever loads the prompts reports them."""
    headers = [SoftPrompt.read_metadata(path) for path in prompt_files(directory)]
    bases = {header["base_model"] for header in headers if header}
    if len(bases) != 1:
        raise SoftPromptError(f"give --model: the prompts in {directory} name base models {sorted(bases) or 'none'}")
    return bases.pop()
