import json

import torch

from softprompt.data import Dataset, Example
from softprompt.sweep import Cell, grid, run_sweep
from softprompt.tasks import TaskSpec
from softprompt.train import TrainConfig

TASK = TaskSpec(name="toy", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
EXAMPLES = [Example({"text": t}, i % 2, None, "r") for i, t in enumerate(["great", "dull", "wit", "long"] * 2)]


def test_sweep_writes_results_table_plot_and_resumes(tmp_path, llama_backbone):
    dataset = Dataset(TASK, EXAMPLES, EXAMPLES[:4], EXAMPLES[:4])
    cells = grid(["tiny"], ["prompt", "prefix"], [1, 3], ["vocab"], [0])
    base = TrainConfig(batch_size=4, steps=2, eval_every=2, patience=0, valid_limit=None)
    loads = []

    def load(name):
        loads.append(name)
        return llama_backbone

    rows = run_sweep(cells, dataset, tmp_path / "ablation", base, load=load, progress=lambda _: None)
    assert len(rows) == 5 and loads == ["tiny"]  # 4 cells + the hand-written baseline
    lines = (tmp_path / "ablation.jsonl").read_text().splitlines()
    assert {(json.loads(line)["method"], json.loads(line)["length"]) for line in lines} == {
        ("hand-written", 0), ("prompt", 1), ("prompt", 3), ("prefix", 1), ("prefix", 3)}
    assert "| tiny | prefix | vocab | 3 | 1 |" in (tmp_path / "ablation.md").read_text()
    size = sum(p.numel() for p in llama_backbone.model.parameters())
    assert {json.loads(line)["parameters"] for line in lines} == {size}
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resuming: one more seed runs only the new cells.
    more = grid(["tiny"], ["prompt"], [1, 3], ["vocab"], [0, 1])
    rows = run_sweep(more, dataset, tmp_path / "ablation", base, load=load, progress=lambda _: None)
    assert len((tmp_path / "ablation.jsonl").read_text().splitlines()) == 7 and len(rows) == 7


def test_model_tuning_cells_have_no_length_or_init_and_leave_the_backbone_frozen(tmp_path, llama_backbone):
    cells = grid(["tiny"], ["prompt", "model-tuning"], [1, 3], ["vocab", "uniform"], [0])
    assert [c for c in cells if c.method == "model-tuning"] == [Cell("tiny", "model-tuning", 0, "-", 0)]
    before = {name: p.clone() for name, p in llama_backbone.model.named_parameters()}
    dataset = Dataset(TASK, EXAMPLES, EXAMPLES[:4], EXAMPLES[:4])
    base = TrainConfig(batch_size=4, steps=2, eval_every=2, patience=0, valid_limit=None, lr=1e-3)
    rows = run_sweep(cells[-1:], dataset, tmp_path / "baselines", base, load=lambda _: llama_backbone,
                     progress=lambda _: None)
    tuned = [row for row in rows if row["method"] == "model-tuning"]
    assert len(tuned) == 1 and 0.0 <= tuned[0]["test_accuracy"] <= 1.0 and tuned[0]["steps_run"] == 2
    assert "| tiny | model-tuning | - | 0 | 1 |" in (tmp_path / "baselines.md").read_text()
    for name, parameter in llama_backbone.model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_a_failing_cell_is_recorded_with_its_reason_and_the_sweep_goes_on(tmp_path, llama_backbone):
    dataset = Dataset(TASK, EXAMPLES, EXAMPLES[:4], EXAMPLES[:4])
    cells = grid(["tiny"], ["prompt"], [2], ["zeros", "vocab"], [0])
    base = TrainConfig(batch_size=4, steps=1, eval_every=1, patience=0, valid_limit=None)
    rows = run_sweep(cells, dataset, tmp_path / "s", base, load=lambda _: llama_backbone, progress=lambda _: None)
    by_init = {row["init"]: row for row in rows}
    assert by_init["zeros"]["status"] == "failed" and "unknown init 'zeros'" in by_init["zeros"]["error"]
    assert by_init["vocab"]["status"] == "ok"
    assert "* tiny prompt zeros K=2 seed 0: SoftPromptError: unknown init 'zeros'" in (tmp_path / "s.md").read_text()
    # A rerun retries the failed cell (and only it).
    attempts = []
    run_sweep(cells, dataset, tmp_path / "s", base, load=lambda _: llama_backbone, progress=attempts.append)
    assert len(attempts) == 2 and "zeros" in attempts[0]  # the cell line and its failure line


def test_several_models_also_get_the_accuracy_against_size_plot(tmp_path, llama_backbone):
    from conftest import make_backbone

    bigger = make_backbone("qwen2")  # q/k/v biases: a different parameter count
    dataset = Dataset(TASK, EXAMPLES, EXAMPLES[:4], EXAMPLES[:4])
    cells = grid(["small", "big"], ["prompt"], [2], ["vocab"], [0])
    base = TrainConfig(batch_size=4, steps=1, eval_every=1, patience=0, valid_limit=None)
    rows = run_sweep(cells, dataset, tmp_path / "scale", base, progress=lambda _: None,
                     load=lambda name: llama_backbone if name == "small" else bigger)
    assert len({row["parameters"] for row in rows}) == 2
    assert (tmp_path / "scale-by-size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
