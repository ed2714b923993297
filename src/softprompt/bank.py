"""PromptBank: many prompts for ONE frozen model, served together in mixed-task batches.

Each prompt's keys/values are computed once when it is loaded (so prompt length costs almost nothing per request)
and stacked into one padded PromptCache; a batch gathers one prompt per row. `reload()` rescans the directory and
swaps in a new immutable snapshot, so requests already running finish on the old one and none is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import Backbone, PromptCache
from .data import Example, TaskTokenizer, scoring_batch
from .errors import SoftPromptError
from .evaluate import Prediction, generate_texts, padding_bounded_batches
from .prompt import SoftPrompt, prompt_files

log = logging.getLogger("softprompt.bank")
MAX_PROMPT_LENGTH = 1024  # virtual tokens; the paper's longest is 150, and a prompt's cache grows with its length


def by_snapshot(run: Callable[[list, Snapshot], list], items: list[tuple[Snapshot, tuple]]) -> list:
    """Run (snapshot, request) items, each on the snapshot it was checked against: `run(requests, snapshot)` once
    per snapshot present, answers back in the items' order. A reload between a request's check and its batch then
    never turns it into an unknown prompt."""
    groups: dict[int, tuple[Snapshot, list[int]]] = {}
    for position, (snapshot, _) in enumerate(items):
        groups.setdefault(id(snapshot), (snapshot, []))[1].append(position)
    answers: list = [None] * len(items)
    for snapshot, positions in groups.values():
        for position, answer in zip(positions, run([items[p][1] for p in positions], snapshot)):
            answers[position] = answer
    return answers


class UnknownPrompt(SoftPromptError):
    """A request named a prompt the bank does not hold."""


@dataclass(frozen=True)
class Entry:
    name: str
    prompt: SoftPrompt
    task_tokenizer: TaskTokenizer
    index: int  # row of this prompt in the snapshot's PromptCache
    width: int  # its real slots there (BOS + prompt), the rest is left padding
    stamp: tuple[int, int]  # (mtime_ns, size) of the file it came from


@dataclass(frozen=True)
class Snapshot:
    entries: dict[str, Entry]
    cache: PromptCache | None
    rejected: dict[str, str]  # file name -> reason it is not served


class PromptBank:
    """`max_padding`: a batch whose rows differ in length runs as length-sorted sub-batches with at most this share
    of padded positions. None: 0.25 on a CPU whose backbone computes padding (padding costs what real tokens cost
    there and another forward pass little; docs/benchmarks.md measures the padding of real request mixes); no
    splitting where the backbone drops padding itself (`Backbone.drops_padding`) or on a GPU, where a batch's cost
    is mostly its kernel launches."""

    def __init__(self, backbone: Backbone, max_input_tokens: int = 256, max_padding: float | None = None,
                 max_prompt_length: int = MAX_PROMPT_LENGTH):
        backbone.require("mix_prompts", "a PromptBank (mixed-prompt batches)")
        self.backbone = backbone
        self.max_input_tokens = max_input_tokens
        self.max_prompt_length = max_prompt_length  # longer prompt files are rejected (memory and time at load)
        if max_padding is None:
            max_padding = 0.25 if backbone.device.type == "cpu" and not backbone.drops_padding else 1.0
        self.max_padding = max_padding
        self.directory: Path | None = None
        self.snapshot = Snapshot({}, None, {})
        self._reload_lock = threading.Lock()

    @classmethod
    def from_directory(cls, backbone: Backbone, directory: str | Path, max_input_tokens: int = 256,
                       max_prompt_length: int = MAX_PROMPT_LENGTH) -> PromptBank:
        bank = cls(backbone, max_input_tokens, max_prompt_length=max_prompt_length)
        bank.directory = Path(directory)
        if not bank.directory.is_dir():
            raise SoftPromptError(f"prompt directory {directory} does not exist")
        bank.reload()
        return bank

    def reload(self) -> dict[str, list[str]]:
        """Rescan the directory; new or changed files go live, removed ones leave. A file that cannot be served is
        skipped with its reason (`rejected`); if it replaced a good version of its prompt, that version stays
        served. Returns what changed."""
        with self._reload_lock:
            old = self.snapshot
            prompts: dict[str, tuple[SoftPrompt, tuple[int, int]]] = {}
            rejected: dict[str, str] = {}
            for path in prompt_files(self.directory):
                name = path.name[: -len(".safetensors")]
                try:
                    stat = path.stat()
                    stamp = (stat.st_mtime_ns, stat.st_size)
                    if name in old.entries and old.entries[name].stamp == stamp:
                        prompts[name] = (old.entries[name].prompt, stamp)
                        continue
                    prompts[name] = (self._checked(path), stamp)
                except Exception as error:  # noqa: BLE001 - one bad file never stops the others
                    reason = str(error) if isinstance(error, SoftPromptError) else f"{type(error).__name__}: {error}"
                    if name in old.entries:
                        prompts[name] = (old.entries[name].prompt, old.entries[name].stamp)
                        reason += "; the last good version stays served"
                    rejected[path.name] = reason
                    log.warning("not serving %s: %s", path, reason)
            self.snapshot = self._build(prompts, rejected)
            new = self.snapshot.entries
            return {
                "added": sorted(set(new) - set(old.entries)),
                "updated": sorted(n for n in set(new) & set(old.entries) if new[n].stamp != old.entries[n].stamp),
                "removed": sorted(set(old.entries) - set(new)),
                "rejected": sorted(rejected),
            }

    def _checked(self, path: Path) -> SoftPrompt:
        prompt = SoftPrompt.load(path, max_length=self.max_prompt_length)
        prompt.check_backbone(self.backbone)
        return prompt

    def add(self, name: str, prompt: SoftPrompt) -> None:
        """Serve an in-memory prompt (the Python API; directories use reload). A prompt that cannot be served is
        an error here, not a `rejected` entry."""
        prompt.check_backbone(self.backbone)
        TaskTokenizer(self.backbone, prompt.task, self.max_input_tokens)  # e.g. a verbalizer that tokenizes to nothing
        with self._reload_lock:
            prompts = {n: (e.prompt, e.stamp) for n, e in self.snapshot.entries.items()}
            prompts[name] = (prompt, (0, 0))
            self.snapshot = self._build(prompts, self.snapshot.rejected)

    @torch.no_grad()
    def _build(self, prompts: dict[str, tuple[SoftPrompt, tuple[int, int]]], rejected: dict[str, str]) -> Snapshot:
        entries, caches, rejected = {}, [], dict(rejected)
        for name, (prompt, stamp) in prompts.items():
            try:
                task_tokenizer = TaskTokenizer(self.backbone, prompt.task, self.max_input_tokens)
                cache = prompt.cache(self.backbone)
            except SoftPromptError as error:  # e.g. a verbalizer this tokenizer turns into nothing
                rejected[f"{name}.safetensors"] = str(error)
                continue
            entries[name] = Entry(name, prompt, task_tokenizer, len(caches), cache.width, stamp)
            caches.append(cache)
        return Snapshot(entries, PromptCache.stack(caches) if caches else None, rejected)

    def entry(self, name: str, snapshot: Snapshot | None = None) -> Entry:
        entries = (snapshot or self.snapshot).entries
        if name not in entries:
            raise UnknownPrompt(f"unknown prompt {name!r}; serving: {', '.join(sorted(entries)) or 'none'}")
        return entries[name]

    @torch.inference_mode()
    def classify(self, requests: list[tuple[str, dict[str, str]]], snapshot: Snapshot | None = None
                 ) -> list[Prediction]:
        """A batch mixing any prompts: (prompt name, row fields) -> label + probabilities. One forward pass, or
        a few of similar-length rows (`max_padding`). `snapshot`: the one the requests were checked against
        (default the current one: one consistent view even if a reload lands meanwhile)."""
        snapshot = snapshot or self.snapshot
        entries = self._checked_entries(snapshot, requests, classify=True)
        items = [(e.task_tokenizer.label_ids, e.task_tokenizer.encode(Example(fields, None, None, "request")))
                 for e, (_, fields) in zip(entries, requests)]
        scored = {}
        for part in padding_bounded_batches([len(item.input_ids) for _, item in items], self.max_padding):
            scored.update(zip(part, self._score(snapshot, [entries[i] for i in part], [items[i] for i in part])))
        return [scored[index] for index in range(len(items))]

    @staticmethod
    def _batch_slots(snapshot: Snapshot, entries: list[Entry]) -> PromptCache:
        """The bank's cache cut to the slots this batch's prompts fill, not the bank's longest prompt."""
        if not snapshot.cache.layers:
            return snapshot.cache
        width = max(e.width for e in entries)
        return snapshot.cache.last_slots(width, padded=any(e.width < width for e in entries))

    def _score(self, snapshot: Snapshot, entries: list[Entry], items: list) -> list[Prediction]:
        """One forward pass over (label ids, encoded input) items, each with its entry's prompt."""
        batch, groups, owners = scoring_batch(items, self.backbone.pad_id)
        prompt_index = torch.tensor([e.index for e in entries], device=self.backbone.device)[owners]
        cache = self._batch_slots(snapshot, entries)
        logprobs = self.backbone.target_logprobs(batch, prompt_index=prompt_index, cache=cache).cpu()
        flat = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, logprobs)
        predictions, offset = [], 0
        for entry in entries:
            labels = entry.prompt.task.labels
            predictions.append(Prediction.of_scores(labels, flat[offset : offset + len(labels)]))
            offset += len(labels)
        return predictions

    def generate(self, name: str, rows: list[dict[str, str]], max_new_tokens: int = 64) -> list[str]:
        """Greedy one-line answers from a generation prompt, the inputs decoded together."""
        return self.generate_mixed([(name, fields, max_new_tokens) for fields in rows])

    @torch.inference_mode()
    def generate_mixed(self, requests: list[tuple[str, dict[str, str], int]], snapshot: Snapshot | None = None
                       ) -> list[str]:
        """A batch mixing any generation prompts: (prompt name, row fields, max new tokens) -> one-line answer;
        the rows decode together, each after its own prompt (`Backbone.generate`). `snapshot`: as for classify."""
        snapshot = snapshot or self.snapshot
        entries = self._checked_entries(snapshot, [(name, fields) for name, fields, _ in requests], classify=False)
        items = [e.task_tokenizer.encode(Example(fields, None, None, "request"))
                 for e, (_, fields, _) in zip(entries, requests)]
        return generate_texts(self.backbone, entries[0].task_tokenizer, items, self._batch_slots(snapshot, entries),
                              [budget for _, _, budget in requests], prompt_index=[e.index for e in entries])

    def _checked_entries(self, snapshot: Snapshot, requests: list[tuple[str, dict[str, str]]],
                         classify: bool) -> list[Entry]:
        """Each request's entry, refusing a prompt of the other kind or fields its template lacks."""
        entries = []
        for name, fields in requests:
            entry = self.entry(name, snapshot)
            entry.prompt.task.require_kind(classify, name)
            entry.prompt.task.template_values(fields, f"prompt {name!r}")
            entries.append(entry)
        return entries
