"""What a task is: a template that turns a row into text, and either labels to rank or free text to generate."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field

from .errors import SoftPromptError

DEFAULT_TEMPLATE = "{text}"


@dataclass
class TaskSpec:
    """A classification task when `labels` is set (rank the `verbalizer` strings), else a generation task.

    `verbalizer[i]` is the text scored for `labels[i]`; by default the label with a leading space, which is how
    the word follows "Sentiment:" in running text.
    """

    name: str = "custom"
    template: str = DEFAULT_TEMPLATE
    labels: list[str] | None = None
    verbalizer: list[str] | None = None
    label_field: str = "label"
    metric: str = "accuracy"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        placeholders = template_fields(self.template)
        if not placeholders:
            raise SoftPromptError(f"template {self.template!r} has no {{field}} placeholder for the input text")
        if self.labels is not None:
            if len(self.labels) < 2:
                raise SoftPromptError(f"a classification task needs at least 2 labels, got {self.labels}")
            if len(set(self.labels)) != len(self.labels):
                raise SoftPromptError(f"labels must be distinct, got {self.labels}")
            if self.verbalizer is None:
                self.verbalizer = [" " + label for label in self.labels]
            if len(self.verbalizer) != len(self.labels):
                raise SoftPromptError(
                    f"verbalizer has {len(self.verbalizer)} entries but there are {len(self.labels)} labels"
                )
        elif self.metric == "accuracy":
            self.metric = "exact_match"

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    @property
    def fields(self) -> list[str]:
        return template_fields(self.template)

    def missing_field(self, row: dict) -> str | None:
        """The first template field the row lacks, if any."""
        return next((name for name in self.fields if name not in row), None)

    def template_values(self, row: dict, where: str) -> dict[str, str]:
        """The row's values of the template's fields, as text; a missing field is an error at `where`."""
        missing = self.missing_field(row)
        if missing:
            raise SoftPromptError(f"{where}: template field {missing!r} is not in the row (template fields: "
                                  f"{', '.join(self.fields)}; the row has: {', '.join(map(str, row))})")
        values = {name: str(row[name]) for name in self.fields}
        for name, value in values.items():
            try:  # a lone surrogate ("\ud800", valid JSON) is no text a tokenizer can take
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise SoftPromptError(f"{where}: field {name!r} is not valid Unicode text ({error.reason} at "
                                      f"character {error.start})") from None
        return values

    def require_kind(self, classify: bool, prompt_name: str) -> None:
        """Classifiers classify and generation prompts generate: say which call the other kind needs."""
        if self.is_classification != classify:
            raise SoftPromptError(f"prompt {prompt_name!r} generates text: use POST /v1/generate (or generate)"
                                  if classify else
                                  f"prompt {prompt_name!r} is a classifier: use POST /v1/classify (or classify)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        """A task from its JSON form (a prompt file's metadata), each field's type checked first."""
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        for key, value in known.items():
            if key in ("labels", "verbalizer"):
                ok = value is None or (isinstance(value, list) and all(isinstance(item, str) for item in value))
            else:
                ok = isinstance(value, dict if key == "extra" else str)
            if not ok:
                wanted = "a list of strings or null" if key in ("labels", "verbalizer") else (
                    "an object" if key == "extra" else "a string")
                raise SoftPromptError(f"task field {key!r} must be {wanted}, got {value!r:.80}")
        return cls(**known)


def template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise SoftPromptError(f"template {template!r} is malformed: {error}") from error
    if any(name == "" or not name.isidentifier() for name in names):
        raise SoftPromptError(f"template {template!r}: placeholders must be field names like {{text}}")
    return list(dict.fromkeys(names))


def split_template(template: str) -> tuple[str, str]:
    """Split after the last placeholder: truncation cuts the head (the input), never the tail ("Sentiment:")."""
    end = template.rindex("}") + 1
    return template[:end], template[end:]


def unescape(text: str) -> str:
    """Let command-line templates and labels say \\n and \\t."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
