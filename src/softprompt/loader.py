"""Load a frozen model of the right kind: name -> local weights (models.py) -> CausalLM, EncoderDecoderLM or
EncoderClassifier, in the precision asked for, optionally split over devices."""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref

import torch
from transformers import PreTrainedModel

from .backbone import HALF_TYPES, Backbone
from .causal import CausalLM
from .encoder_classifier import EncoderClassifier
from .errors import SoftPromptError
from .models import DEFAULT_MODEL, resolve
from .seq2seq import EncoderDecoderLM

DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def model_kind(config) -> tuple[type[Backbone], str]:
    """The one place a model's kind is decided: (Backbone class, transformers auto class name)."""
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        return EncoderDecoderLM, "AutoModelForSeq2SeqLM"
    if architectures and all(a.endswith(("Model", "ForMaskedLM", "ForSequenceClassification"))
                             for a in architectures):  # BertModel, RobertaForMaskedLM, ...: a bare encoder
        return EncoderClassifier, "AutoModel"
    return CausalLM, "AutoModelForCausalLM"


def parse_device_map(text: str | None) -> str | dict | None:
    """A --device-map value: one of accelerate's strategy names, or a JSON {module: device} object."""
    if text is None or text in DEVICE_MAP_NAMES:
        return text
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise SoftPromptError(f"--device-map is not valid JSON: {error}") from None
    raise SoftPromptError(f"--device-map {text!r}: use auto, balanced, sequential or a JSON map")


def cast_frozen_linears(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Store the frozen linear layers' weights (and biases) in the dtype autocast computes them in. Autocast keeps
    a cast only of weights that require grad, so with frozen fp32 weights every forward pass rounds all of them
    again (and training keeps those copies for backward). Same values: autocast would round them exactly so. A head
    tied to the input embeddings gets its own copy: the embeddings stay fp32 (prompts live among them; the
    fingerprint hashes them)."""
    embeddings = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if module.weight is embeddings:
                module.weight = torch.nn.Parameter(embeddings.detach().to(dtype), requires_grad=False)
            module.to(dtype)


def load_model(name: str | None = None, precision: str = "auto", device_map: str | dict | None = None,
               offload_folder: str | None = None) -> Backbone:
    """Load a frozen model by built-in name, local directory, .gguf path or cached HF id.

    `precision`: "auto" (bf16 autocast where the hardware has it, fp16 on older CUDA GPUs, else fp32), "bf16",
    "fp16" or "fp32". With bf16/fp16 the frozen linear weights are stored in that dtype (`cast_frozen_linears`), so
    the precision is fixed at load.
    `device_map` (accelerate; for frozen models larger than one device): "auto", "balanced", "sequential", a JSON
    text or {module: device}, with "cpu" and "disk" allowed ("disk" under `offload_folder`, default a temp folder);
    layers then run where they live.
    """
    import transformers

    name = name or DEFAULT_MODEL
    directory = resolve(name)
    kind, auto_class = model_kind(transformers.AutoConfig.from_pretrained(directory))
    loader = getattr(transformers, auto_class)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    device_map = parse_device_map(device_map) if isinstance(device_map, str) else device_map
    if device_map is None:
        model = loader.from_pretrained(directory, dtype=torch.float32)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    else:
        own_folder = offload_folder is None
        offload_folder = offload_folder or tempfile.mkdtemp(prefix="softprompt-offload-")
        model = loader.from_pretrained(directory, dtype=torch.float32, device_map=device_map,
                                       offload_folder=offload_folder)
        if own_folder:  # offloaded weights are read back at every call: the folder goes with the model
            weakref.finalize(model, shutil.rmtree, offload_folder, True)
        if model.get_input_embeddings().weight.device.type == "meta":
            raise SoftPromptError("device_map put the input embeddings on disk; keep them on a device (they are "
                                  "read for every prompt and for the model's fingerprint)")
    backbone = kind(model, tokenizer, name=name, precision=precision)
    # offloaded weights (meta here) are loaded by accelerate at each call, as stored: those stay fp32
    offloaded = any(parameter.device.type == "meta" for parameter in model.parameters())
    if backbone.precision in HALF_TYPES and not offloaded:
        cast_frozen_linears(model, HALF_TYPES[backbone.precision])
    return backbone
