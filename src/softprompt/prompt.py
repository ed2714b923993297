"""SoftPrompt: the learned [K, d] matrix plus what it is for, stored as one self-describing safetensors file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone, PrefixCache
from .errors import SoftPromptError
from .files import write_atomically
from .tasks import TaskSpec

FORMAT = "softprompt/1"


METHODS = ("prompt", "prefix")


def prefix_cache(backbone: Backbone, tensor: torch.Tensor, method: str) -> PrefixCache:
    """Keys/values of BOS + one prompt: run the model over input embeddings ("prompt"), or take learned per-layer
    keys/values as they are ("prefix"). Differentiable, so training uses it too."""
    if method == "prefix":
        return backbone.prefix_from_key_values(tensor.unsqueeze(0))
    if method == "prompt":
        return backbone.prompt_key_values(tensor.unsqueeze(0))
    raise SoftPromptError(f"unknown method {method!r}; choose {' or '.join(METHODS)}")


@torch.no_grad()
def prefix_from_embeddings(backbone: Backbone, embeddings: torch.Tensor) -> torch.Tensor:
    """[layers, 2, kv_heads, K, head_dim]: the keys/values an input-embedding prompt produces at every layer, so a
    deep prompt starts exactly where the shallow one would."""
    backbone.require_deep_prompts()
    cache = backbone.prompt_key_values(embeddings.to(backbone.device).unsqueeze(0))
    skip = len(backbone.bos_ids)
    return torch.stack([torch.stack([k[0, :, skip:], v[0, :, skip:]]) for k, v in cache.layers]).float()


@dataclass
class SoftPrompt:
    """Method "prompt": `embeddings` [K, d] in front of the input (Lester et al.). Method "prefix" (deep prompts,
    prefix-tuning / P-tuning v2): `prefix` [layers, 2, kv_heads, K, head_dim], learned keys/values at every layer."""

    embeddings: torch.Tensor | None  # [K, d], float32
    base_model: str
    fingerprint: str
    task: TaskSpec
    init: str = "class-label"
    training: dict = field(default_factory=dict)
    prefix: torch.Tensor | None = None
    head: torch.Tensor | None = None  # [labels, d]: encoder-only models' label head (encoder_model.py)

    @property
    def method(self) -> str:
        return "prefix" if self.prefix is not None else "prompt"

    @property
    def length(self) -> int:
        return self.prefix.shape[3] if self.prefix is not None else self.embeddings.shape[0]

    @property
    def tensor(self) -> torch.Tensor:
        """The trained tensor, whichever the method."""
        return self.prefix if self.prefix is not None else self.embeddings

    def prefix_cache(self, backbone: Backbone) -> PrefixCache:
        """BOS + this prompt's keys/values for `backbone`, ready for Backbone.target_logprobs(prompt_kv=...)."""
        tensor = self.tensor if self.head is None else torch.cat([self.embeddings, self.head])
        return prefix_cache(backbone, tensor.to(backbone.device), self.method)

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
        tensors = {"prefix" if self.prefix is not None else "prompt": tensor}
        if self.head is not None:
            tensors["head"] = self.head.detach().float().cpu().contiguous()
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
        embeddings, prefix = tensors.get("prompt"), tensors.get("prefix")
        if embeddings is not None and embeddings.ndim != 2:
            raise SoftPromptError(f"{path}: prompt tensor must be [K, d], found shape {list(embeddings.shape)}")
        if prefix is not None and (prefix.ndim != 5 or prefix.shape[1] != 2):
            raise SoftPromptError(f"{path}: prefix tensor must be [layers, 2, kv_heads, K, head_dim], found shape "
                                  f"{list(prefix.shape)}")
        head = tensors.get("head")
        labels = TaskSpec.from_dict(meta["task"]).labels
        if head is not None and (embeddings is None or head.ndim != 2 or labels is None
                                 or list(head.shape) != [len(labels), embeddings.shape[1]]):
            raise SoftPromptError(f"{path}: head tensor must be [labels, d] = {[len(labels or []), '<d>']}, found "
                                  f"shape {list(head.shape)}")
        return cls(
            embeddings=embeddings,
            prefix=prefix,
            head=head,
            base_model=meta["base_model"],
            fingerprint=meta["fingerprint"],
            task=TaskSpec.from_dict(meta["task"]),
            init=meta.get("init", "unknown"),
            training=meta.get("training", {}),
        )

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse to run on a model other than the one the prompt was trained on."""
        if self.prefix is not None:
            layers, heads, head_dim = backbone.key_value_shape
            expected = [layers, 2, heads, self.length, head_dim]
            if list(self.prefix.shape) != expected:
                raise SoftPromptError(f"prefix prompt trained on {self.base_model!r} has shape "
                                      f"{list(self.prefix.shape)}; {backbone.name!r} needs {expected}")
        elif self.embeddings.shape[1] != backbone.d_model:
            raise SoftPromptError(
                f"prompt was trained on {self.base_model!r} (d={self.embeddings.shape[1]}) but the loaded model "
                f"{backbone.name!r} has d={backbone.d_model}"
            )
        if (self.head is not None) != backbone.is_encoder_only:
            raise SoftPromptError(
                f"prompt was trained on {self.base_model!r} "
                f"({'an encoder-only model, with a label head' if self.head is not None else 'a language model'}); "
                f"{backbone.name!r} is {'an encoder-only model' if backbone.is_encoder_only else 'a language model'}")
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
