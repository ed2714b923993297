"""What every frozen model kind offers the rest of softprompt, and the values that pass between them.

`Backbone` is the small interface train / evaluate / bank / serve ask of a frozen model: tokenize, embed, the
prompt cache (keys/values where the kind can cache them), log-probs of target tokens under prompts, generation.
Its capabilities are properties, refused in one place (`require`). The kinds are siblings: `causal.CausalLM`
(decoder-only), `seq2seq.EncoderDecoderLM`, `encoder_classifier.EncoderClassifier`; `loader.py` picks one.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import prompt_attention
from .errors import SoftPromptError


@dataclass
class PromptCache:
    """What runs start from for P prompts: keys/values of BOS + prompt, computed once and reused for every example.

    Prompts of different lengths are LEFT-padded to L slots; `mask` marks the real ones, and an example's tokens
    start at position `lengths[p]`. Keys are rotated at their true positions when computed, and left padding keeps
    cache-index distances equal to position distances (sliding-window layers use the former), so it is exact.
    """

    layers: list[tuple[Tensor, Tensor]]  # per layer: keys, values [P, heads, L, head_dim]
    mask: Tensor  # [P, L], 1 for real slots
    lengths: Tensor  # [P]
    # Kinds that cache nothing (their encoder sees the prompt and the input together) carry each prompt's
    # embeddings [K, d] themselves, and an encoder classifier each prompt's label head [labels, d].
    embeddings: list[Tensor] | None = None
    padded: bool = False  # some prompt has padded slots (`stack` of unequal widths): attention needs `mask`
    label_heads: list[Tensor] | None = None

    @staticmethod
    def of_tensors(prompts: Tensor | None, device: torch.device, label_heads: Tensor | None = None) -> PromptCache:
        """For models whose prompt states depend on the input (bidirectional encoders): nothing is cached, the
        prompt tensors [P, K, d] (and label heads [P, labels, d]) travel as they are."""
        count = next((len(tensor) for tensor in (prompts, label_heads) if tensor is not None), 1)
        length = 0 if prompts is None else prompts.shape[1]
        return PromptCache([], torch.ones(count, length, dtype=torch.long, device=device),
                           torch.full((count,), length, dtype=torch.long, device=device),
                           embeddings=None if prompts is None else list(prompts),
                           label_heads=None if label_heads is None else list(label_heads))

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def last_slots(self, width: int, padded: bool) -> PromptCache:
        """The last `width` slots of every prompt: prompts are left-padded, so one of at most `width` slots loses
        only padding. `padded`: whether the prompts that will be read still have padded slots."""
        if width == self.width and padded == self.padded:
            return self
        start = self.width - width
        return PromptCache([(keys[:, :, start:], values[:, :, start:]) for keys, values in self.layers],
                           self.mask[:, start:], self.lengths, self.embeddings, padded, self.label_heads)

    @staticmethod
    def stack(caches: list[PromptCache]) -> PromptCache:
        """One cache holding every prompt of `caches` (each may hold several), padded to the longest."""
        width = max(cache.width for cache in caches)

        def pad(tensor: Tensor, dim: int) -> Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        def joined(groups: list[list[Tensor] | None]) -> list[Tensor] | None:  # kinds that carry tensors
            return None if all(group is None for group in groups) else [t for group in groups for t in group]

        layers = [
            (torch.cat([pad(c.layers[i][0], 2) for c in caches]), torch.cat([pad(c.layers[i][1], 2) for c in caches]))
            for i in range(len(caches[0].layers))
        ]
        padded = any(c.padded or c.width < width for c in caches)
        return PromptCache(layers, torch.cat([pad(c.mask, 1) for c in caches]), torch.cat([c.lengths for c in caches]),
                           joined([c.embeddings for c in caches]), padded, joined([c.label_heads for c in caches]))


def generation_rows(count: int, max_new_tokens: int | list[int],
                    prompt_index: list[int] | None) -> tuple[list[int], list[int]]:
    """Each of `count` rows' token budget and prompt number (the first prompt unless told)."""
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * count
    return budgets, prompt_index if prompt_index is not None else [0] * count


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths as [rows, longest] ids, right-padded with `pad_id`, and their 0/1 mask."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
    return ids, mask


@dataclass
class TokenBatch:
    """Right-padded token rows plus the tokens whose log-probs are wanted.

    `target_positions[i]` is the position in row `target_rows[i]` whose output predicts `target_ids[i]`.
    """

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    target_rows: Tensor  # [N]
    target_positions: Tensor  # [N]
    target_ids: Tensor  # [N]

    def __post_init__(self) -> None:
        # Every forward path relies on right padding (the packed pass has no mask at all: a real token never
        # looks past itself), so anything else is refused. Checked where it is free: batches built on the CPU.
        mask = self.attention_mask
        if mask.device.type == "cpu" and bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise SoftPromptError("TokenBatch.attention_mask must be right-padded: each row's 1s, then its 0s")


# torch.compile's modes; "reduce-overhead" replays each compiled layer as a CUDA graph (one launch per layer)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# capability -> (the Backbone property that says whether a kind has it, what it takes in the words of the refusal)
CAPABILITIES = {
    "cache_prompts": ("can_cache_prompts", "a causal LM (only there do a prompt's keys/values not depend on the "
                                           "input)"),
    "concat_prompts": ("can_concat_prompts", "a causal LM (BOS + prompt embeddings in front of the tokens' own)"),
    "deep_prompts": ("can_run_deep_prompts", "a causal LM (deep prompts are keys/values at every layer of a "
                                             "decoder)"),
    "generate": ("can_generate", "a language model (an encoder classifier scores labels with a head)"),
    "mix_prompts": ("can_mix_prompts", "a causal LM or an encoder classifier (an encoder-decoder runs one prompt "
                                       "length per batch)"),
    "plain_prompt_tensors": ("takes_plain_prompt_tensors", "a causal LM whose attention takes the prompt as plain "
                             f"tensors ({', '.join(sorted(prompt_attention.MODEL_TYPES))})"),
    "language_model_head": ("scores_with_lm_head", "a language model that scores label words (an encoder "
                                                   "classifier has no such head)"),
}


class Backbone:
    """A frozen model (every base weight has `requires_grad=False`) plus its tokenizer."""

    kind = "a frozen model"  # how errors name this kind
    can_cache_prompts = False
    can_concat_prompts = False
    can_run_deep_prompts = False
    can_generate = False
    can_mix_prompts = False
    takes_plain_prompt_tensors = False  # prompt keys/values reach attention as plain tensors (compile, checkpoints)
    scores_with_label_head = False  # labels are scored by a learned head, not by the model's own words
    drops_padding = False  # precomputed-prompt batches run without their padding (causal LMs on a CPU)

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 precision: str = "fp32"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.precision = resolve_precision(precision, self.device)
        self.checkpointed_layers: list[torch.nn.Module] = []  # while activation_checkpointing() is on

    def require(self, capability: str, feature: str) -> None:
        """Refuse `feature` up front when this kind lacks `capability` (a key of CAPABILITIES)."""
        has, needs = CAPABILITIES[capability]
        if not getattr(self, has):
            raise SoftPromptError(f"{feature} needs {needs}; {self.name!r} is {self.kind} "
                                  f"({self.model.config.model_type!r})")

    @property
    def scores_with_lm_head(self) -> bool:
        return not self.scores_with_label_head

    # ---- what each kind implements ----

    def prompt_cache(self, prompts: Tensor | None, label_heads: Tensor | None = None) -> PromptCache:
        """What runs start from for P prompts [P, K, d] (None: no prompt), reusable for every example."""
        raise NotImplementedError

    def target_logprobs(self, batch: TokenBatch, prompts: Tensor | None = None, prompt_index: Tensor | None = None,
                        cache: PromptCache | None = None) -> Tensor:
        """Log-prob of each target token of `batch`, [N], under `prompts` [P, K, d] or a precomputed `cache`;
        `prompt_index` [B] picks one prompt per row."""
        raise NotImplementedError

    def generate(self, rows: list[list[int]], cache: PromptCache, max_new_tokens: int | list[int],
                 stop_ids: set[int], prompt_index: list[int] | None = None) -> list[list[int]]:
        """Greedy continuations of token rows, each after its prompt in `cache`, for at most its own budget."""
        self.require("generate", "generation")
        raise NotImplementedError

    def compile(self, mode: str | None = None) -> None:
        """torch.compile the layers (causal LMs whose attention takes prompts as plain tensors)."""
        self.require("plain_prompt_tensors", "--compile")

    def zero_shot_cache(self, task) -> PromptCache:
        """What scoring "without a prompt" starts from (an encoder classifier: its starting label head)."""
        return self.prompt_cache(None)

    # ---- shared by every kind ----

    @contextlib.contextmanager
    def activation_checkpointing(self):
        """Recompute each decoder layer's activations in the backward pass instead of storing them (transformers'
        checkpointing, non-reentrant). Checkpointed layers drop a cache object (`past_key_values`): prompts and
        deep prompts reach them as plain tensors in causal LMs (prompt_attention.py), or `routes.plan` takes
        the concat route."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise SoftPromptError(f"{self.name!r} does not support activation checkpointing")
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.checkpointed_layers = layers
        try:
            with self._layers_training(True):
                yield
        finally:
            self.checkpointed_layers = []
            self.model.activation_checkpointing_disable()

    @contextlib.contextmanager
    def _layers_training(self, on: bool):
        """Checkpointing is active in layers in training mode; only the layers themselves, not their children
        (dropout stays in eval mode)."""
        layers = self.checkpointed_layers
        before = [layer.training for layer in layers]
        for layer in layers:
            layer.training = on
        try:
            yield
        finally:
            for layer, mode in zip(layers, before):
                layer.training = mode

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 matmuls over fp32 weights and an fp32 prompt (the master copy stays fp32)."""
        if self.precision in HALF_TYPES:
            return torch.autocast(self.device.type, dtype=HALF_TYPES[self.precision])
        return contextlib.nullcontext()

    def loss_scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; for bf16 and fp32 the scaler passes everything through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the input-embedding matrix: identifies the base model a prompt was trained on."""
        weight = self.model.get_input_embeddings().weight.detach().float().cpu().contiguous()
        digest = hashlib.sha256(str(tuple(weight.shape)).encode())
        digest.update(weight.numpy().tobytes())
        return digest.hexdigest()[:16]

    @cached_property
    def newline_ids(self) -> set[int]:
        """Tokens that contain a line break: generation answers are one line."""
        return {i for i in range(len(self.tokenizer)) if "\n" in self.tokenizer.decode([i])}

    @property
    def eos_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def embed(self, ids: Tensor) -> Tensor:
        # Through the module, not `.weight[ids]`: Gemma scales embeddings by sqrt(d) inside it.
        return self.model.get_input_embeddings()(ids)


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX),
    fp16 on older CUDA GPUs (their tensor cores run fp16, not bf16), else fp32."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise SoftPromptError(f"unknown precision {precision!r}; choose auto, bf16, fp16 or fp32")
    if precision == "fp16" and device.type == "cpu":
        warnings.warn("fp16 on a CPU is emulated unless it has AMX-FP16: several times slower than fp32 "
                      "(docs/benchmarks.md); prefer bf16 or fp32", stacklevel=2)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


