import torch

from softprompt.data import Example, TaskTokenizer
from softprompt.evaluate import classification_report, evaluate, label_scores, predict
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec

TASK = TaskSpec(name="t", template="{text} =", labels=["negative", "positive"])


def test_report_counts_and_macro_f1():
    report = classification_report(TASK, gold=[0, 0, 0, 1, 1], predicted=[0, 0, 1, 1, 0])
    assert report.accuracy == 3 / 5
    assert report.confusion == [[2, 1], [1, 1]]
    # negative: precision 2/3, recall 2/3; positive: precision 1/2, recall 1/2
    assert abs(report.macro_f1 - (2 / 3 + 1 / 2) / 2) < 1e-12
    assert report.per_class["positive"] == {"support": 2, "predicted": 2, "correct": 1, "precision": 0.5,
                                            "recall": 0.5, "f1": 0.5}


def test_multi_token_label_score_is_sum_of_token_logprobs(llama_backbone):
    task = TaskSpec(template="{text} =", labels=["lazy dog", "comp.graphics"])
    task_tokenizer = TaskTokenizer(llama_backbone, task)
    (item,) = task_tokenizer.encode_all([Example({"text": "the quick brown fox"}, 0, None, "r")])
    scores = label_scores(llama_backbone, task_tokenizer, [item])
    with torch.no_grad():
        for label, ids in enumerate(task_tokenizer.label_ids):
            sequence = torch.tensor([item.input_ids + ids])
            logprobs = llama_backbone.model(input_ids=sequence).logits.log_softmax(-1)[0]
            start = len(item.input_ids) - 1
            expected = sum(logprobs[start + k, token] for k, token in enumerate(ids))
            torch.testing.assert_close(scores[0, label], expected, atol=1e-4, rtol=1e-4)


def test_scores_do_not_depend_on_batch_composition(llama_backbone):
    task_tokenizer = TaskTokenizer(llama_backbone, TASK)
    texts = ["a", "the quick brown fox jumps", "wit and life", "dull"]
    items = task_tokenizer.encode_all([Example({"text": t}, 0, None, "r") for t in texts])
    together = label_scores(llama_backbone, task_tokenizer, items, batch_size=4)
    alone = torch.cat([label_scores(llama_backbone, task_tokenizer, [item]) for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_ties_go_to_the_first_label(llama_backbone):
    # Two labels with identical verbalizers score identically: the first listed wins.
    task = TaskSpec(template="{text} =", labels=["a", "b"], verbalizer=[" dog", " dog"])
    report = evaluate(llama_backbone, [Example({"text": "x"}, 1, None, "r")], task=task)
    assert report.confusion == [[0, 0], [1, 0]]


def test_prompt_changes_predictions_and_predict_matches_evaluate(llama_backbone):
    examples = [Example({"text": t}, i % 2, None, "r") for i, t in enumerate(["great", "dull", "wit", "long"])]
    prompt = SoftPrompt(torch.randn(3, llama_backbone.d_model) * 3, llama_backbone.name,
                        llama_backbone.fingerprint, TASK)
    predictions = predict(llama_backbone, prompt, examples)
    report = evaluate(llama_backbone, examples, prompt)
    correct = sum(TASK.labels.index(p.label) == e.label for p, e in zip(predictions, examples))
    assert report.accuracy == correct / len(examples)
    for p in predictions:
        assert abs(sum(p.scores.values()) - 1) < 1e-5 and p.label == max(p.scores, key=p.scores.get)
    plain = predict(llama_backbone, None, examples, task=TASK)
    assert any(abs(a.scores["positive"] - b.scores["positive"]) > 1e-4 for a, b in zip(plain, predictions))


def test_generation_exact_match(llama_backbone):
    task = TaskSpec(name="qa", template="Question: {question}\nAnswer:", labels=None)
    example = Example({"question": "what is two plus two?"}, None, "placeholder", "r")
    from softprompt.evaluate import generate

    task_tokenizer = TaskTokenizer(llama_backbone, task)
    (text,) = generate(llama_backbone, task_tokenizer, task_tokenizer.encode_all([example]), None, max_new_tokens=4)
    example.target = text  # the model's own greedy answer is, by definition, an exact match
    report = evaluate(llama_backbone, [example, Example(example.fields, None, text + " wrong", "r")], task=task,
                      max_new_tokens=4)
    assert report.metric == "exact_match" and report.accuracy == 0.5
