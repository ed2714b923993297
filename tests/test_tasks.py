import pytest

from softprompt.errors import SoftPromptError
from softprompt.tasks import TaskSpec, split_template, template_fields, unescape


def test_fields_and_split():
    assert template_fields("{premise} ... {hypothesis} {premise}") == ["premise", "hypothesis"]
    assert split_template("Review: {text}\nSentiment:") == ("Review: {text}", "\nSentiment:")


def test_default_verbalizer_and_round_trip():
    task = TaskSpec(template="{text}", labels=["negative", "positive"])
    assert task.verbalizer == [" negative", " positive"]
    assert TaskSpec.from_dict(task.to_dict()) == task


def test_generation_task_uses_exact_match():
    assert TaskSpec(template="{q}").metric == "exact_match"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template": "no fields"}, "has no {field} placeholder"),
        ({"template": "{text", "labels": ["a", "b"]}, "malformed"),
        ({"template": "{0}", "labels": ["a", "b"]}, "placeholders must be field names"),
        ({"template": "{text}", "labels": ["a"]}, "at least 2 labels"),
        ({"template": "{text}", "labels": ["a", "a"]}, "distinct"),
        ({"template": "{text}", "labels": ["a", "b"], "verbalizer": [" a"]}, "verbalizer has 1 entries"),
    ],
)
def test_bad_tasks(kwargs, message):
    with pytest.raises(SoftPromptError, match=message):
        TaskSpec(**kwargs)


def test_unescape():
    assert unescape(r"Review: {text}\nSentiment:") == "Review: {text}\nSentiment:"
