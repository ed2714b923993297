"""Prompts in and out of other tools: PEFT prompt-tuning adapters, the paper's `.npy` prompt arrays, and
per-request input embeddings for engines that accept them (vLLM's `prompt_embeds`, transformers' `inputs_embeds`).

PEFT puts its virtual tokens before everything, softprompt puts them after BOS: for models whose tokenizer adds
no BOS (SmolLM2, Qwen2.5) the two are the same computation; for BOS models (Gemma) an exported prompt sees the
BOS after itself under PEFT, so scores differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .backbone import Backbone
from .data import Example, TaskTokenizer
from .errors import SoftPromptError
from .files import write_atomically, write_directory_atomically
from .prompt import SoftPrompt
from .tasks import TaskSpec

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def export_peft(prompt: SoftPrompt, directory: str | Path, backbone: Backbone | None = None) -> Path:
    """Write a PEFT PROMPT_TUNING adapter directory (config + `prompt_embeddings`), atomically."""
    require_input_prompt(prompt, "a PEFT prompt-tuning adapter")
    directory = Path(directory)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.length,
        "token_dim": prompt.embeddings.shape[1],
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "base_model_name_or_path": prompt.base_model,
        "inference_mode": True,
    }
    if backbone is not None:
        config["num_layers"] = backbone.model.config.num_hidden_layers
        config["num_attention_heads"] = backbone.model.config.num_attention_heads

    def write(staging: Path) -> None:
        save_file({"prompt_embeddings": prompt.embeddings.float().contiguous()}, str(staging / PEFT_WEIGHTS))
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2))

    return write_directory_atomically(directory, write)


def import_peft(directory: str | Path, backbone: Backbone, task: TaskSpec) -> SoftPrompt:
    """Read a PEFT prompt-tuning adapter; PEFT files carry no task, so the caller gives one."""
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise SoftPromptError(f"{directory} is not a PEFT adapter directory (no {PEFT_CONFIG})")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "PROMPT_TUNING":
        raise SoftPromptError(f"{directory} holds a PEFT {config.get('peft_type')} adapter; only PROMPT_TUNING "
                              "adapters are soft prompts")
    if config.get("num_transformer_submodules", 1) != 1:
        raise SoftPromptError(f"{directory}: encoder-decoder adapters (num_transformer_submodules="
                              f"{config['num_transformer_submodules']}) are not supported")
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise SoftPromptError(f"{directory} has no {PEFT_WEIGHTS} (only safetensors adapters are read, no pickle)")
    embeddings = load_file(str(weights)).get("prompt_embeddings")
    if embeddings is None:
        raise SoftPromptError(f"{weights} has no 'prompt_embeddings' tensor")
    return _prompt(embeddings, backbone, task, f"peft:{directory.name}", str(directory))


def import_npy(path: str | Path, backbone: Backbone, task: TaskSpec) -> SoftPrompt:
    """The paper's code saves prompts as a [K, d] numpy array."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SoftPromptError(f"{path} is not a readable .npy array: {error}") from None
    return _prompt(torch.from_numpy(np.asarray(array, dtype=np.float32)), backbone, task, f"npy:{Path(path).name}",
                   str(path))


def _prompt(embeddings: torch.Tensor, backbone: Backbone, task: TaskSpec, init: str, source: str) -> SoftPrompt:
    if embeddings.ndim != 2 or embeddings.shape[1] != backbone.d_model:
        raise SoftPromptError(f"{source}: prompt has shape {list(embeddings.shape)}, but {backbone.name!r} needs "
                              f"[K, {backbone.d_model}]")
    return SoftPrompt(embeddings.float(), backbone.name, backbone.fingerprint, task, init=init,
                      training={"imported_from": source})


def require_input_prompt(prompt: SoftPrompt, what: str) -> None:
    if prompt.method != "prompt":
        raise SoftPromptError(f"{what} holds input embeddings; this is a {prompt.method} (deep) prompt")
    if prompt.label_head is not None:
        raise SoftPromptError(f"{what} holds input embeddings only; this prompt also has a label head for an "
                              "encoder classifier")


# ---------- per-request input embeddings (vLLM prompt_embeds, transformers inputs_embeds) ----------

PROMPT_EMBEDS_FORMAT = "softprompt-prompt-embeds/1"


def request_embeddings(backbone: Backbone, prompt: SoftPrompt, examples: list[Example],
                       max_input_tokens: int = 256) -> list[torch.Tensor]:
    """One [L, d] tensor per example: BOS (if the model uses one) + the prompt + the templated, tokenized input,
    in the space `inputs_embeds` takes in transformers (after the embedding module's own scaling). An engine that
    takes whole-request embeddings needs nothing else to run the soft prompt."""
    require_input_prompt(prompt, "an engine's prompt_embeds input")
    backbone.require("concat_prompts", "an engine's prompt_embeds input")
    prompt.check_backbone(backbone)
    task_tokenizer = TaskTokenizer(backbone, prompt.task, max_input_tokens)
    with torch.no_grad():
        in_front = backbone.prompt_embeddings(prompt.embeddings.to(backbone.device).unsqueeze(0))[0]
        rows = [torch.tensor(item.input_ids, device=backbone.device) for item in task_tokenizer.encode_all(examples)]
        return [torch.cat([in_front, backbone.embed(ids)]).float().cpu() for ids in rows]


def embedding_scale(backbone: Backbone) -> float:
    """The factor the embedding module applies to table rows (Gemma: sqrt(d)); engines that multiply by it after
    taking `prompt_embeds` (vLLM's Gemma models do) need the exported tensors divided by it."""
    return float(getattr(backbone.model.get_input_embeddings(), "embed_scale", 1.0))


def export_prompt_embeds(prompt: SoftPrompt, backbone: Backbone, path: str | Path) -> Path:
    """A safetensors file with `prefix_embeds` [L, d] (BOS + prompt, as `request_embeddings` puts in front of every
    input) and the task, base model and embedding scale in its metadata: enough for a client of a serving engine
    to build each request's embeddings from the base model's embedding table alone."""
    require_input_prompt(prompt, "a prompt-embeds export")
    backbone.require("concat_prompts", "a prompt-embeds export")
    prompt.check_backbone(backbone)
    with torch.no_grad():
        in_front = backbone.prompt_embeddings(prompt.embeddings.to(backbone.device).unsqueeze(0))[0].float().cpu()
    metadata = {"format": PROMPT_EMBEDS_FORMAT, "base_model": prompt.base_model, "fingerprint": prompt.fingerprint,
                "task": json.dumps(prompt.task.to_dict()), "bos_ids": json.dumps(backbone.bos_ids),
                "embedding_scale": repr(embedding_scale(backbone))}
    return write_atomically(path, lambda tmp: save_file({"prefix_embeds": in_front.contiguous()}, str(tmp),
                                                        metadata=metadata))


# ---------- one entry for every export format ----------

EXPORT_FORMATS = ("peft", "npy", "prompt-embeds")


def export_npy(prompt: SoftPrompt, path: str | Path) -> Path:
    """The paper's [K, d] float32 array (what `import_npy` reads), written atomically."""
    require_input_prompt(prompt, "a .npy prompt array")
    array = prompt.embeddings.detach().float().cpu().numpy()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # given a name instead, np.save would add ".npy" to the temp file's name
            np.save(handle, array, allow_pickle=False)

    return write_atomically(path, write)


def export(prompt: SoftPrompt, out: str | Path, format: str,
           load_backbone: Callable[[], Backbone] | None = None) -> Path:
    """Write `prompt` to `out` in one of EXPORT_FORMATS. Only "prompt-embeds" needs the model: `load_backbone` is
    called for it alone, so the other formats load none."""
    if format == "peft":
        return export_peft(prompt, out)
    if format == "npy":
        return export_npy(prompt, out)
    if format == "prompt-embeds":
        if load_backbone is None:
            raise SoftPromptError("the prompt-embeds export needs the base model: pass load_backbone")
        return export_prompt_embeds(prompt, load_backbone(), out)
    raise SoftPromptError(f"unknown export format {format!r}; choose {', '.join(EXPORT_FORMATS[:-1])} or "
                          f"{EXPORT_FORMATS[-1]}")
