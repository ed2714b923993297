"""The frozen language model: embed tokens, put prompts in front, return log-probs at the target tokens only.

Two equivalent ways to run a batch with soft prompts (see docs/ARCHITECTURE.md):
- "cached": the prompt does not depend on the input under a causal mask, so its keys/values are computed once per
  distinct prompt (batch of P, not B), gathered per example, and only the real tokens run, with shifted positions.
  When the prompt itself is given (training), prompts and tokens run packed in one pass (prefix_attention.py).
  With precomputed keys/values on a CPU, the rows' padding does not run either (`drops_padding`).
- "concat": the reference path: prompt embeddings concatenated in front of the token embeddings.
Either way the LM head is applied only at the positions that predict a target token, never to `[B, T, V]`.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import lean_backward, prefix_attention
from .errors import SoftPromptError
from .prefix_attention import gather_rows

# torch.compile's modes; "reduce-overhead" replays each compiled layer as a CUDA graph (one launch per layer)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class PrefixCache:
    """Keys/values of BOS + prompt for P prompts, computed once and reused for every example using them.

    Prompts of different lengths are LEFT-padded to L slots; `mask` marks the real ones, and an example's tokens
    start at position `lengths[p]`. Keys are rotated at their true positions when computed, and left padding keeps
    cache-index distances equal to position distances (sliding-window layers use the former), so it is exact.
    """

    layers: list[tuple[Tensor, Tensor]]  # per layer: keys, values [P, heads, L, head_dim]
    mask: Tensor  # [P, L], 1 for real slots
    lengths: Tensor  # [P]
    # Encoder-decoder models cache nothing (their encoder sees the prompt and the input together): the prompt
    # embeddings [P, K, d] themselves travel here instead (see seq2seq.py).
    embeddings: list[Tensor] | None = None
    padded: bool = False  # some prompt has padded slots (`stack` of unequal widths): attention needs `mask`

    @staticmethod
    def of_tensors(prompts: Tensor | None, device: torch.device) -> PrefixCache:
        """For models whose prompt states depend on the input (bidirectional encoders): nothing is cached, the
        prompt tensors [P, K, d] travel as they are."""
        count = 1 if prompts is None else prompts.shape[0]
        length = 0 if prompts is None else prompts.shape[1]
        return PrefixCache([], torch.ones(count, length, dtype=torch.long, device=device),
                           torch.full((count,), length, dtype=torch.long, device=device),
                           embeddings=None if prompts is None else list(prompts))

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def last_slots(self, width: int, padded: bool) -> PrefixCache:
        """The last `width` slots of every prompt: prompts are left-padded, so one of at most `width` slots loses
        only padding. `padded`: whether the prompts that will be read still have padded slots."""
        if width == self.width and padded == self.padded:
            return self
        start = self.width - width
        return PrefixCache([(keys[:, :, start:], values[:, :, start:]) for keys, values in self.layers],
                           self.mask[:, start:], self.lengths, self.embeddings, padded)

    @staticmethod
    def stack(caches: list[PrefixCache]) -> PrefixCache:
        """One cache holding every prompt of `caches` (each may hold several), padded to the longest."""
        width = max(cache.width for cache in caches)

        def pad(tensor: Tensor, dim: int) -> Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        layers = [
            (torch.cat([pad(c.layers[i][0], 2) for c in caches]), torch.cat([pad(c.layers[i][1], 2) for c in caches]))
            for i in range(len(caches[0].layers))
        ]
        embeddings = None
        if any(c.embeddings is not None for c in caches):  # models that cache nothing carry the tensors themselves
            embeddings = [tensor for c in caches for tensor in c.embeddings]
        padded = any(c.padded or c.width < width for c in caches)
        return PrefixCache(layers, torch.cat([pad(c.mask, 1) for c in caches]), torch.cat([c.lengths for c in caches]),
                           embeddings, padded)


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


class Backbone:
    """A frozen causal LM (every base weight has `requires_grad=False`) plus its tokenizer."""

    is_seq2seq = False
    is_encoder_only = False

    def require_deep_prompts(self) -> None:
        """Per-layer key/value prompts need a causal model's attention cache."""
        if self.is_seq2seq or self.is_encoder_only:
            kind = "an encoder-decoder" if self.is_seq2seq else "an encoder-only"
            raise SoftPromptError(f"deep prompts (--method prefix) need a causal LM; {self.name!r} is {kind} model")

    def zero_shot_prompts(self, task) -> Tensor | None:
        """What scoring "without a prompt" runs with: nothing for language models (encoder-only models need
        their label head, see encoder_model.py)."""
        return None

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str,
                 precision: str = "fp32"):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.logit_softcap = getattr(model.config, "final_logit_softcapping", None)
        self.bos_ids = self._leading_special_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.precision = resolve_precision(precision, self.device)
        # Prompt keys/values as plain tensors in attention (compilable, no cache object) where the family allows.
        self.prefix_attention = prefix_attention.supports(model)
        self.compiled = False  # see compile()
        self.checkpointed_layers: list[torch.nn.Module] = []  # while activation_checkpointing() is on
        # Batches with prompt keys/values run their real tokens only, as one row (`RaggedRows`), on a CPU, where
        # padding costs what a real token costs. GPUs keep padded batches: a batch's cost there is mostly kernel
        # launches, and dropping padding adds a few per layer (bench/padding.py, H100: 0.69-0.83x as fast).
        self.drops_padding = self.prefix_attention and self.device.type == "cpu"
        if self.prefix_attention:
            prefix_attention.enable(model)
        lean_backward.install(model)  # fewer activations kept for the backward pass, same values

    def compile(self, mode: str | None = None) -> None:
        """torch.compile each decoder layer in place (regional compilation, dynamic shapes). The layers are alike,
        so they share one compiled graph: compiling takes about as long for 30 layers as for one, where compiling
        the whole stack grew with depth. Only the packed training pass runs compiled (`_run_body`). `mode`:
        torch.compile's, e.g. "reduce-overhead" (CUDA graphs: fewer kernel launches from the host)."""
        if mode not in COMPILE_MODES:
            raise SoftPromptError(f"unknown compile mode {mode!r}; choose one of "
                                  f"{', '.join(name for name in COMPILE_MODES if name)}")
        self.require_plain_prefix("--compile")
        if self.compiled:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer

        # inductor decides what the backward keeps (and recomputes elementwise chains) on its own; the lean
        # autograd functions would only split each layer's graph
        lean_backward.remove(self.model)
        for layer in self.body.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.compile(dynamic=True, mode=mode)
        self.compiled = True

    def require_plain_prefix(self, feature: str) -> None:
        """`feature` needs the prompt's keys/values to reach attention as plain tensors (prefix_attention.py)."""
        if self.is_seq2seq or self.is_encoder_only or not self.prefix_attention:
            raise SoftPromptError(f"{feature} supports the causal LMs whose attention takes the prompt as plain "
                                  f"tensors ({', '.join(sorted(prefix_attention.MODEL_TYPES))}); {self.name!r} "
                                  f"is a {self.model.config.model_type!r} model")

    def _run_body(self, **inputs) -> BaseModelOutputWithPast:
        """The decoder stack under autocast. Compiled layers serve the packed pass only: the other passes index
        per-layer state (a cache object, a layer's prompt keys/values) that would make every layer a recompile.
        A pass with a cache object runs without activation checkpointing, which would drop the cache."""
        eager = self.compiled and "packed_prompts" not in inputs
        uses_cache = inputs.get("use_cache") or inputs.get("past_key_values") is not None
        with (self.autocast(), torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext(),
              self._layers_training(False) if uses_cache else contextlib.nullcontext()):
            return self.body(**inputs)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 matmuls over fp32 weights and an fp32 prompt (the master copy stays fp32)."""
        if self.precision in HALF_TYPES:
            return torch.autocast(self.device.type, dtype=HALF_TYPES[self.precision])
        return contextlib.nullcontext()

    def loss_scaler(self) -> torch.amp.GradScaler:
        """fp16 gradients underflow without loss scaling; for bf16 and fp32 the scaler passes everything through."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @contextlib.contextmanager
    def activation_checkpointing(self):
        """Recompute each decoder layer's activations in the backward pass instead of storing them (transformers'
        checkpointing, non-reentrant). Checkpointed layers drop a cache object (`past_key_values`): prompts and
        deep prompts reach them as plain tensors (prefix_attention.py), or `target_logprobs` takes the concat
        path."""
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

    def _leading_special_ids(self) -> list[int]:
        """The BOS the tokenizer would add (Gemma, Llama-2 style); the prompt goes after it."""
        with_special = self.tokenizer("a")["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        return with_special[: len(with_special) - len(without)] if with_special[-len(without) :] == without else []

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

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def embed(self, ids: Tensor) -> Tensor:
        # Through the module, not `.weight[ids]`: Gemma scales embeddings by sqrt(d) inside it.
        return self.model.get_input_embeddings()(ids)

    def prefix_embeddings(self, prompts: Tensor | None) -> Tensor:
        """[P, L, d]: BOS (if the tokenizer uses one) followed by each prompt; L may be 0."""
        bos = self.embed(torch.tensor([self.bos_ids], dtype=torch.long, device=self.device))
        if prompts is None:
            return bos
        prompts = prompts.to(bos.dtype)
        return torch.cat([bos.expand(prompts.shape[0], -1, -1), prompts], dim=1)

    def prompt_key_values(self, prompts: Tensor | None) -> PrefixCache:
        """Keys/values of BOS + each prompt, computed once: reusable for every example with that prompt."""
        prefix = self.prefix_embeddings(prompts)
        count, length = prefix.shape[0], prefix.shape[1]
        mask = torch.ones(count, length, dtype=torch.long, device=self.device)
        lengths = torch.full((count,), length, dtype=torch.long, device=self.device)
        if length == 0:
            return PrefixCache([], mask, lengths)
        positions = torch.arange(length, device=self.device).unsqueeze(0).expand(count, -1)
        output = self._run_body(inputs_embeds=prefix, position_ids=positions, use_cache=True)
        return PrefixCache([(layer.keys, layer.values) for layer in output.past_key_values.layers], mask, lengths)

    @cached_property
    def key_value_shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the cache, read off a one-token run (works for any architecture)."""
        self.require_deep_prompts()
        with torch.no_grad():
            layers = self.prompt_key_values(torch.zeros(1, 1, self.d_model, device=self.device)).layers
        return len(layers), layers[0][0].shape[1], layers[0][0].shape[3]

    def prefix_from_key_values(self, prefix: Tensor) -> PrefixCache:
        """A PrefixCache from learned per-layer keys/values [P, layers, 2, kv_heads, K, head_dim] (deep prompts),
        after BOS's own keys/values when the tokenizer uses a BOS."""
        self.require_deep_prompts()
        count, length = prefix.shape[0], prefix.shape[4]
        bos = self.prompt_key_values(None)
        layers = []
        for index in range(prefix.shape[1]):
            keys, values = prefix[:, index, 0], prefix[:, index, 1]
            if bos.width:
                bos_keys, bos_values = bos.layers[index]
                keys = torch.cat([bos_keys.expand(count, -1, -1, -1).to(keys.dtype), keys], dim=2)
                values = torch.cat([bos_values.expand(count, -1, -1, -1).to(values.dtype), values], dim=2)
            layers.append((keys, values))
        width = bos.width + length
        mask = torch.ones(count, width, dtype=torch.long, device=self.device)
        return PrefixCache(layers, mask, torch.full((count,), width, dtype=torch.long, device=self.device))

    def target_logprobs(
        self,
        batch: TokenBatch,
        prompts: Tensor | None = None,
        prompt_index: Tensor | None = None,
        path: str = "cached",
        prompt_kv: PrefixCache | None = None,
    ) -> Tensor:
        """Log-prob of each target token, [N]. `prompts` is [P, K, d]; `prompt_index` [B] picks one per row.

        `prompt_kv` (cached path): reuse keys/values computed earlier by `prompt_key_values` (or a PromptBank)
        instead of recomputing them from `prompts`.
        """
        input_ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        rows, length = input_ids.shape
        if prompt_index is None:
            prompt_index = torch.zeros(rows, dtype=torch.long, device=self.device)
        prompt_index = prompt_index.to(self.device)
        prompts_to_run = path == "cached" and prompt_kv is None and prompts is not None
        packable = prompts_to_run and self._takes_plain_prefix(len(self.bos_ids) + prompts.shape[1] + length)
        if prompts_to_run and not packable and self.checkpointed_layers:
            path = "concat"  # the other route runs its tokens after a cache object, which would go unchecked
        if packable:  # training: the prompt's keys/values change every step, so they come from the same pass
            hidden = self._packed_hidden(prompts, input_ids, prompt_index)
        elif path == "cached":
            prefix = prompt_kv if prompt_kv is not None else self.prompt_key_values(prompts)
            hidden = self._cached_hidden(prefix, input_ids, mask, prompt_index)
        elif path == "concat":
            prefix = self.prefix_embeddings(prompts)
            prefix_length = prefix.shape[1]
            embeds = torch.cat([prefix[prompt_index], self.embed(input_ids)], dim=1)
            full_mask = torch.cat([mask.new_ones(rows, prefix_length), mask], dim=1)
            positions = torch.arange(prefix_length + length, device=self.device).unsqueeze(0).expand(rows, -1)
            hidden = self._run_body(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, use_cache=False
            ).last_hidden_state[:, prefix_length:]
        else:
            raise SoftPromptError(f"unknown forward path {path!r}; use 'cached' or 'concat'")
        selected = hidden[batch.target_rows.to(self.device), batch.target_positions.to(self.device)]
        with self.autocast():
            logits = self.head(selected).float()
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.log_softmax(-1).gather(1, batch.target_ids.to(self.device).unsqueeze(1)).squeeze(1)

    def _takes_plain_prefix(self, total_length: int) -> bool:
        """Prompt keys/values can reach attention as plain tensors (no cache object) for this many positions."""
        return self.prefix_attention and prefix_attention.fits(self.model, total_length)

    def _packed_hidden(self, prompts: Tensor, input_ids: Tensor, prompt_index: Tensor) -> Tensor:
        """[B, T, d] hidden states of the right-padded tokens, with the prompts run in the same pass
        (prefix_attention.py; no mask needed, see `packed_attention`)."""
        rows, length = input_ids.shape
        prefix = self.prefix_embeddings(prompts)
        count, width = prefix.shape[0], prefix.shape[1]
        # No views go into the compiled layers (the row is a cat, the index a copy): a view's base size becomes a
        # guard that the next call fails (another compile), e.g. the first layer's input vs every later layer's.
        embeds = torch.cat([prefix.view(1, -1, self.d_model),
                            self.embed(input_ids).view(1, -1, self.d_model).to(prefix.dtype)], dim=1)
        positions = torch.cat([torch.arange(width, device=self.device).repeat(count),
                               torch.arange(width, width + length, device=self.device).repeat(rows)])
        packed = prefix_attention.PackedPrompts(count, width, rows, length, prompt_index.clone(),
                                                causal_lower_right(length, width + length))
        hidden = self._run_body(inputs_embeds=embeds, position_ids=positions.unsqueeze(0),
                                attention_mask=prefix_attention.unused_mask(self.device), packed_prompts=packed,
                                use_cache=False).last_hidden_state
        return hidden[0, count * width :].view(rows, length, -1)

    def _cached_hidden(self, prefix: PrefixCache, input_ids: Tensor, mask: Tensor, prompt_index: Tensor) -> Tensor:
        """[B, T, d] hidden states of the tokens after precomputed prompt keys/values, gathered per row."""
        rows, length = input_ids.shape
        positions = prefix.lengths[prompt_index].unsqueeze(1) + torch.arange(length, device=self.device)
        layers = [(gather_rows(k, prompt_index), gather_rows(v, prompt_index)) for k, v in prefix.layers]
        if not (layers and self._takes_plain_prefix(prefix.width + length)):
            # a transformers cache object: any architecture, any sliding window
            cache = DynamicCache(ddp_cache_data=layers, config=self.model.config) if layers else None
            return self._run_body(inputs_embeds=self.embed(input_ids), position_ids=positions,
                                  attention_mask=torch.cat([gather_rows(prefix.mask, prompt_index), mask], dim=1),
                                  past_key_values=cache, use_cache=cache is not None).last_hidden_state
        inputs = dict(prefix_key_values=layers, use_cache=False)
        if prefix.padded:
            inputs.update(attention_mask=prefix_attention.prefix_causal_mask(
                gather_rows(prefix.mask, prompt_index), mask))
        else:  # every prompt slot is real: no mask at all (`lower_right_attention`)
            inputs.update(attention_mask=prefix_attention.unused_mask(self.device),
                          token_bias=causal_lower_right(length, prefix.width + length))
        if not self.drops_padding or bool(mask.all()):
            return self._run_body(inputs_embeds=self.embed(input_ids), position_ids=positions,
                                  **inputs).last_hidden_state
        # the linear layers (most of the FLOPs) see only the real tokens; attention pads them again, in place
        real = mask.reshape(-1).nonzero().squeeze(1)
        hidden = self._run_body(inputs_embeds=self.embed(input_ids.reshape(-1)[real]).unsqueeze(0),
                                position_ids=positions.reshape(-1)[real].unsqueeze(0),
                                ragged_rows=prefix_attention.RaggedRows(rows, length, real), **inputs)
        hidden = hidden.last_hidden_state[0]
        return hidden.new_zeros(rows * length, hidden.shape[-1]).index_copy_(0, real, hidden).view(rows, length, -1)

    @torch.no_grad()
    def generate(self, rows: list[list[int]], prefix: PrefixCache, max_new_tokens: int | list[int],
                 stop_ids: set[int], prompt_index: list[int] | None = None) -> list[list[int]]:
        """Greedy decoding of several inputs as one batch, each after its prompt in `prefix` (`prompt_index`,
        default the first), for at most its own `max_new_tokens` (one for all, or one per row); each row stops
        at any of `stop_ids`. Rows are right-padded and prompts left-padded: the mask hides the padding from
        every later token and each row's positions count its own real slots and tokens, so a row decodes as it
        would alone."""
        budgets, prompt_index = generation_rows(len(rows), max_new_tokens, prompt_index)
        if len(rows) > 1 and not prefix_attention.fits(self.model, prefix.width + max(map(len, rows))
                                                        + max(budgets)):
            # a sliding window counts cache slots, padding included: rows that outgrow it decode alone, exactly
            return [self.generate([row], prefix, [budget], stop_ids, [index])[0]
                    for row, budget, index in zip(rows, budgets, prompt_index)]
        ids, token_mask = (tensor.to(self.device) for tensor in right_pad(rows, self.pad_id))
        (count, width), lengths = ids.shape, token_mask.sum(1)
        prompts = torch.tensor(prompt_index, device=self.device)
        layers = [(gather_rows(k, prompts), gather_rows(v, prompts)) for k, v in prefix.layers]
        cache = DynamicCache(ddp_cache_data=layers or None, config=self.model.config)
        mask = torch.cat([gather_rows(prefix.mask, prompts), token_mask], dim=1)
        start = prefix.lengths.to(self.device)[prompts]  # each row's first token position: after its prompt
        positions = start.unsqueeze(1) + torch.arange(width, device=self.device)
        hidden = self._run_body(inputs_embeds=self.embed(ids), attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).last_hidden_state
        last = hidden[torch.arange(count, device=self.device), lengths - 1]
        generated: list[list[int]] = [[] for _ in rows]
        running = {row for row, budget in enumerate(budgets) if budget > 0}
        for step in range(max(budgets)):
            with self.autocast():
                tokens = self.head(last).argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                if row in running:
                    if token in stop_ids:
                        running.discard(row)
                    else:
                        generated[row].append(token)
                        if len(generated[row]) == budgets[row]:
                            running.discard(row)
            if not running:
                break
            mask = torch.cat([mask, mask.new_ones(count, 1)], dim=1)  # finished rows run on, unread
            hidden = self._run_body(inputs_embeds=self.embed(tokens.unsqueeze(1)), attention_mask=mask,
                                    position_ids=(start + lengths + step).unsqueeze(1),
                                    past_key_values=cache, use_cache=True).last_hidden_state
            last = hidden[:, -1]
        return generated


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


def cast_frozen_linears(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Store the frozen linear layers' weights (and biases) in the dtype autocast computes them in. Autocast keeps
    a cast only of weights that require grad, so with frozen fp32 weights every forward pass rounds all of them
    again (and training keeps those copies for backward): on a 2-core CPU, nearly half of a lone request's forward
    pass. Same values: autocast would round them exactly so. A head tied to the input embeddings gets its own
    copy: the embeddings stay fp32 (prompts live among them; the fingerprint hashes them)."""
    embeddings = model.get_input_embeddings().weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if module.weight is embeddings:
                module.weight = torch.nn.Parameter(embeddings.detach().to(dtype), requires_grad=False)
            module.to(dtype)


def load_model(name: str | None = None, precision: str = "auto", device_map: str | dict | None = None,
               offload_folder: str | None = None) -> Backbone:
    """Load a frozen causal LM (or an encoder-decoder such as T5, see seq2seq.py) by built-in name, local
    directory, .gguf path or cached HF id.

    `precision`: "auto" (bf16 autocast where the hardware has it, fp16 on older CUDA GPUs, else fp32), "bf16",
    "fp16" or "fp32". With bf16/fp16 the frozen linear weights are stored in that dtype (`cast_frozen_linears`), so
    the precision is fixed at load.
    `device_map` (accelerate; for frozen models larger than one device): "auto", "balanced", "sequential" or
    {module: device}, with "cpu" and "disk" (under `offload_folder`) allowed; layers then run where they live.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from .encoder_model import EncoderBackbone
    from .models import DEFAULT_MODEL, resolve
    from .seq2seq import Seq2SeqBackbone

    name = name or DEFAULT_MODEL
    directory = resolve(name)
    config = AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        kind, loader = Seq2SeqBackbone, AutoModelForSeq2SeqLM
    elif architectures and all(a.endswith(("Model", "ForMaskedLM", "ForSequenceClassification"))
                               for a in architectures):  # BertModel, RobertaForMaskedLM, ...: a bare encoder
        kind, loader = EncoderBackbone, AutoModel
    else:
        kind, loader = Backbone, AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if device_map is None:
        model = loader.from_pretrained(directory, dtype=torch.float32)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    else:
        model = loader.from_pretrained(directory, dtype=torch.float32, device_map=device_map,
                                       offload_folder=offload_folder)
        if model.get_input_embeddings().weight.device.type == "meta":
            raise SoftPromptError("device_map put the input embeddings on disk; keep them on a device (they are "
                                  "read for every prompt and for the model's fingerprint)")
    backbone = kind(model, tokenizer, name=name, precision=precision)
    # offloaded weights (meta here) are loaded by accelerate at each call, as stored: those stay fp32
    offloaded = any(parameter.device.type == "meta" for parameter in model.parameters())
    if backbone.precision in HALF_TYPES and not offloaded:
        cast_frozen_linears(model, HALF_TYPES[backbone.precision])
    return backbone
