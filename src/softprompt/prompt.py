"""SoftPrompt: the learned [K, d] matrix plus what it is for, stored as one self-describing safetensors file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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
        """The checked metadata of a prompt file without reading its tensors (`task` as a TaskSpec); None if it is
        not a readable prompt file."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            return _checked_metadata(Path(path), header) if header.get("format") == FORMAT else None
        except (SafetensorError, OSError, ValueError, SoftPromptError):
            return None

    @classmethod
    def load(cls, path: str | Path, max_length: int | None = None) -> SoftPrompt:
        """Read and check a prompt file: safetensors only (no pickle), the metadata schema, float tensors of the
        right shapes, finite values, 1 <= K <= `max_length` (when given). Any problem is a SoftPromptError naming
        the file and what is wrong."""
        path = Path(path)
        tensors, header = _read_safetensors(path)
        if header.get("format") != FORMAT or not ({"prompt", "prefix"} & set(tensors)):
            raise SoftPromptError(
                f"{path} is a safetensors file but not a softprompt prompt file (format {header.get('format')!r}, "
                f"expected {FORMAT!r} with a 'prompt' or 'prefix' tensor)"
            )
        meta = _checked_metadata(path, header)
        task = meta["task"]
        embeddings = _checked_tensor(path, tensors, "prompt", "[K, d]", 2, 0, max_length)
        key_values = _checked_tensor(path, tensors, "prefix", "[layers, 2, kv_heads, K, head_dim]", 5, 3, max_length)
        if key_values is not None and key_values.shape[1] != 2:
            raise SoftPromptError(f"{path}: prefix tensor must be [layers, 2, kv_heads, K, head_dim], found shape "
                                  f"{list(key_values.shape)}")
        head = _checked_tensor(path, tensors, "head", "[labels, d]", 2, None, None)
        if head is not None and (embeddings is None or task.labels is None
                                 or list(head.shape) != [len(task.labels), embeddings.shape[1]]):
            raise SoftPromptError(f"{path}: head tensor must be [labels, d] = {[len(task.labels or []), '<d>']}, "
                                  f"found shape {list(head.shape)}")
        return cls(embeddings=embeddings, key_values=key_values, label_head=head, base_model=meta["base_model"],
                   fingerprint=meta["fingerprint"], task=task, init=meta["init"], training=meta["training"])

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse to run on a model other than the one the prompt was trained on, or one too short for it."""
        if self.length >= backbone.max_positions:
            raise SoftPromptError(f"prompt has K={self.length} virtual tokens; {backbone.name!r} takes "
                                  f"{backbone.max_positions} positions in all, input included")
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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise SoftPromptError(f"prompt file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise SoftPromptError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    return tensors, header


def _checked_metadata(path: Path, header: dict[str, str]) -> dict:
    """The JSON header with the types a prompt file promises; `task` becomes a TaskSpec."""
    try:
        meta = json.loads(header.get("softprompt", ""))
    except json.JSONDecodeError as error:
        raise SoftPromptError(f"{path}: the 'softprompt' metadata is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise SoftPromptError(f"{path}: the 'softprompt' metadata must be a JSON object, got {type(meta).__name__}")
    for key, kind in (("base_model", str), ("fingerprint", str), ("task", dict)):
        if not isinstance(meta.get(key), kind):
            raise SoftPromptError(f"{path}: metadata field {key!r} must be a {kind.__name__}, got "
                                  f"{type(meta.get(key)).__name__}")
    for key, kind, default in (("init", str, "unknown"), ("training", dict, {})):
        meta.setdefault(key, default)
        if not isinstance(meta[key], kind):
            raise SoftPromptError(f"{path}: metadata field {key!r} must be a {kind.__name__}")
    try:
        meta["task"] = TaskSpec.from_dict(meta["task"])
    except SoftPromptError as error:
        raise SoftPromptError(f"{path}: metadata field 'task': {error}") from None
    return meta


def _checked_tensor(path: Path, tensors: dict[str, torch.Tensor], name: str, shape: str, ndim: int,
                    length_dim: int | None, max_length: int | None) -> torch.Tensor | None:
    """Tensor `name` as float32, or None if absent: floating point, `ndim` dimensions, finite, and its prompt
    length (dimension `length_dim`) at least 1 and at most `max_length`."""
    tensor = tensors.get(name)
    if tensor is None:
        return None
    if not tensor.is_floating_point():
        raise SoftPromptError(f"{path}: {name} tensor must be floating point, found {tensor.dtype}")
    if tensor.ndim != ndim:
        raise SoftPromptError(f"{path}: {name} tensor must be {shape}, found shape {list(tensor.shape)}")
    if length_dim is not None and not 1 <= tensor.shape[length_dim] <= (max_length or tensor.shape[length_dim]):
        limit = f" (this server takes at most {max_length})" if max_length else ""
        raise SoftPromptError(f"{path}: {name} tensor has K={tensor.shape[length_dim]} virtual tokens; K must be "
                              f"at least 1{limit}")
    # a copy: safetensors maps the file into memory, and a file overwritten in place later (a new version being
    # written) would change the prompt being served under it
    tensor = tensor.to(torch.float32, copy=True)
    if not bool(torch.isfinite(tensor).all()):
        raise SoftPromptError(f"{path}: {name} tensor holds NaN or infinite values")
    return tensor
