import json

from softprompt.data import Dataset, Example
from softprompt.sweep import grid, run_sweep
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
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resuming: one more seed runs only the new cells.
    more = grid(["tiny"], ["prompt"], [1, 3], ["vocab"], [0, 1])
    rows = run_sweep(more, dataset, tmp_path / "ablation", base, load=load, progress=lambda _: None)
    assert len((tmp_path / "ablation.jsonl").read_text().splitlines()) == 7 and len(rows) == 7
