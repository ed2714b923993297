import json

import pytest

from softprompt.data import Example, TaskTokenizer, load_dataset, read_rows, to_examples
from softprompt.errors import SoftPromptError
from softprompt.tasks import TaskSpec

TASK = TaskSpec(template="Review: {text}\nSentiment:", labels=["negative", "positive"])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"text": "ok", "label": "positive"}\n{"text": "broken", \n')
    with pytest.raises(SoftPromptError, match=r"train\.jsonl:2: invalid JSON"):
        read_rows(path)


def test_jsonl_line_must_be_an_object(tmp_path):
    path = write(tmp_path / "train.jsonl", '["a", "b"]\n')
    with pytest.raises(SoftPromptError, match=r"train\.jsonl:1: expected a JSON object, found list"):
        read_rows(path)


def test_csv_wrong_field_count_names_line(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\ngood,positive\nbad,negative,extra\n")
    with pytest.raises(SoftPromptError, match=r"train\.csv:3: expected 2 fields \(text, label\), found 3"):
        read_rows(path)


def test_empty_file_is_an_error(tmp_path):
    for name, text in [("empty.jsonl", "\n\n"), ("empty.csv", "text,label\n")]:
        with pytest.raises(SoftPromptError, match="has no examples"):
            read_rows(write(tmp_path / name, text))


def test_unknown_file_type_and_missing_file(tmp_path):
    with pytest.raises(SoftPromptError, match="unsupported data file type '.txt'"):
        read_rows(write(tmp_path / "data.txt", "x"))
    with pytest.raises(SoftPromptError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")


def test_label_not_in_labels_lists_allowed(tmp_path):
    path = write(tmp_path / "t.jsonl", '{"text": "fine", "label": "neutral"}\n')
    with pytest.raises(SoftPromptError, match=r"t\.jsonl:1: label 'neutral' is not one of the labels "
                                              r"\(negative, positive\)"):
        to_examples(read_rows(path), TASK)


def test_label_may_be_an_index(tmp_path):
    path = write(tmp_path / "t.csv", "text,label\ngood,1\nbad,0\n")
    assert [e.label for e in to_examples(read_rows(path), TASK)] == [1, 0]
    path = write(tmp_path / "u.jsonl", '{"text": "x", "label": 5}\n')
    with pytest.raises(SoftPromptError, match="index 0..1"):
        to_examples(read_rows(path), TASK)


def test_template_placeholder_missing_from_row(tmp_path):
    task = TaskSpec(template="{premise} ? {hypothesis}", labels=["no", "yes"])
    path = write(tmp_path / "nli.jsonl", '{"premise": "a", "label": "yes"}\n')
    with pytest.raises(SoftPromptError, match=r"nli\.jsonl:1: template field 'hypothesis' is not in the row"):
        to_examples(read_rows(path), task)


def test_two_input_template(tmp_path, llama_backbone):
    task = TaskSpec(template="{premise}\nQuestion: {hypothesis}?", labels=["no", "yes"])
    path = write(tmp_path / "nli.jsonl", json.dumps({"premise": "a dog", "hypothesis": "a cat", "label": 0}) + "\n")
    (example,) = to_examples(read_rows(path), task)
    item = TaskTokenizer(llama_backbone, task).encode(example)
    assert llama_backbone.tokenizer.decode(item.input_ids) == "a dog\nQuestion: a cat?"


def test_truncation_keeps_template_tail_and_counts(llama_backbone):
    task_tokenizer = TaskTokenizer(llama_backbone, TASK, max_input_tokens=12)
    long = Example({"text": "the quick brown fox jumps over the lazy dog " * 5}, 1, None, "row")
    short = Example({"text": "wit"}, 0, None, "row")
    long_item, short_item = task_tokenizer.encode_all([long, short])
    assert long_item.truncated and not short_item.truncated
    assert len(long_item.input_ids) == 12
    assert llama_backbone.tokenizer.decode(long_item.input_ids).endswith("\nSentiment:")
    assert long_item.input_ids[-len(task_tokenizer.tail_ids):] == task_tokenizer.tail_ids


def test_multi_token_labels_get_one_row_per_label(llama_backbone):
    task = TaskSpec(template="{text} =", labels=["comp.graphics", "lazy dog"])
    task_tokenizer = TaskTokenizer(llama_backbone, task)
    items = task_tokenizer.encode_all([Example({"text": "a"}, 0, None, "r"), Example({"text": "b c"}, 1, None, "r")])
    batch, groups = task_tokenizer.scoring_batch(items)
    assert batch.input_ids.shape[0] == 4
    assert sorted(set(groups.tolist())) == [0, 1, 2, 3]
    assert len(groups) == sum(len(ids) for ids in task_tokenizer.label_ids) * 2


def test_builtin_rotten_tomatoes_split_is_fixed_and_disjoint():
    first, second = load_dataset("rotten-tomatoes"), load_dataset("rotten-tomatoes")
    assert (len(first.train), len(first.validation), len(first.test)) == (10752, 1000, 1000)
    assert [e.fields for e in first.test[:5]] == [e.fields for e in second.test[:5]]
    texts = [{e.fields["text"] for e in split} for split in (first.train, first.validation, first.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert first.task.labels == ["negative", "positive"]
    positives = sum(e.label for e in first.test)
    assert 500 < positives < 650  # 58% of the corpus is "fresh"


def test_builtin_20newsgroups_uses_official_split():
    dataset = load_dataset("20newsgroups")
    assert len(dataset.task.labels) == 20
    assert dataset.task.verbalizer[dataset.task.labels.index("sci.crypt")] == " encryption"
    assert len({e.label for e in dataset.test[:300]}) == 20  # shuffled: a prefix covers every group
    assert len(dataset.test) == 7528 and len(dataset.train) + len(dataset.validation) == 11293


def test_vader_sets_share_the_rotten_tomatoes_task_for_domain_shift():
    reviews, tweets = load_dataset("rotten-tomatoes"), load_dataset("vader-tweets")
    assert (tweets.task.template, tweets.task.labels) == (reviews.task.template, reviews.task.labels)
    assert not tweets.train and len(tweets.test) == 4196  # 4,200 rated tweets, 4 neutral ones dropped
    assert sum(e.label for e in tweets.test) == 2897
    assert tweets.test[0].where.startswith("hutto_ICWSM_2014/tweets_GroundTruth.txt:")


def test_unknown_dataset_lists_builtins():
    with pytest.raises(SoftPromptError, match="unknown dataset 'sst9'; built-in: rotten-tomatoes, 20newsgroups"):
        load_dataset("sst9")


def test_file_dataset_holds_out_validation_and_infers_labels(tmp_path):
    rows = [{"sentence": f"text {i}", "label": ["bad", "good"][i % 2]} for i in range(40)]
    path = write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    dataset = load_dataset(str(path), text_field="sentence")
    assert dataset.task.labels == ["bad", "good"] and dataset.task.template == "{sentence}"
    assert (len(dataset.train), len(dataset.validation)) == (36, 4)


def test_builtin_gsm8k_is_a_generation_task():
    dataset = load_dataset("gsm8k")
    assert not dataset.task.is_classification and dataset.task.metric == "exact_match"
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (919, 100, 300)
    assert all(e.target.strip().lstrip("-").replace(".", "").isdigit() for e in dataset.test)


def test_file_generation_task(tmp_path):
    path = write(tmp_path / "qa.jsonl", json.dumps({"q": "2+2?", "a": "4"}) + "\n")
    dataset = load_dataset(str(path), template="Q: {q}\nA:", label_field="a", generation=True, valid_fraction=0.0)
    assert dataset.task.labels is None and dataset.train[0].target == "4"


def test_parquet_rows_and_errors_name_the_row(tmp_path):
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"review": ["a great film", "dull", "witty"], "label": ["positive", "negative", "meh"]})
    pyarrow.parquet.write_table(table, tmp_path / "train.parquet")
    rows = read_rows(tmp_path / "train.parquet")
    assert rows[0] == (f"{tmp_path / 'train.parquet'}:row 1", {"review": "a great film", "label": "positive"})
    task = TaskSpec(template="{review}", labels=["negative", "positive"])
    with pytest.raises(SoftPromptError, match=r"train.parquet:row 3: label 'meh'"):
        to_examples(rows, task)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(SoftPromptError, match="broken.parquet: not a readable parquet file"):
        read_rows(tmp_path / "broken.parquet")


def test_saved_hf_dataset_dict_gives_splits_and_class_label_names(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = {name: datasets.Dataset.from_dict({"text": [f"{name} {i}" for i in range(n)],
                                                "label": [i % 2 for i in range(n)]}, features=features)
              for name, n in [("train", 6), ("validation", 3), ("test", 2)]}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))

    dataset = load_dataset(str(tmp_path / "saved"))
    assert dataset.task.labels == ["neg", "pos"]  # from the ClassLabel feature, not the integers in the rows
    assert [len(dataset.train), len(dataset.validation), len(dataset.test)] == [6, 3, 2]
    assert dataset.test[1].fields == {"text": "test 1"} and dataset.test[1].label == 1
    assert dataset.train[0].where == f"{tmp_path / 'saved' / 'train'}:row 1"
    # One split's directory is a plain data file; the whole dict is not.
    assert len(read_rows(tmp_path / "saved" / "validation")) == 3
    with pytest.raises(SoftPromptError, match="holds several splits \\(train, validation, test\\)"):
        read_rows(tmp_path / "saved")
    (tmp_path / "plain").mkdir()
    with pytest.raises(SoftPromptError, match="not one saved by datasets' save_to_disk"):
        read_rows(tmp_path / "plain")
