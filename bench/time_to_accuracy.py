"""Wall time to a validation accuracy: softprompt's defaults vs PEFT's usual prompt-tuning recipe.

    python bench/time_to_accuracy.py [--target 0.84] [--steps 150] [--eval-every 25] [--valid 300]

Same machine, same run, same frozen smollm2-135m, same Rotten Tomatoes training order (length-bucketed batches of
16) and validation sentences, same rank-classification scoring for the accuracy. Only training time is counted
(evaluations are excluded for both).
  softprompt: class-label init, K=20, AdamW lr 0.01 with linear decay, rank objective, cached prompt keys/values,
              LM head at the label position only, bf16 autocast where the CPU has it.
  PEFT:       PromptTuningConfig(RANDOM init, K=20), AdamW lr 1e-3, `labels` loss on the label token (its usual
              use), same autocast.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.84)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--valid", type=int, default=300)
    args = parser.parse_args()

    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from softprompt import lean_backward, load_dataset, load_model
    from softprompt.data import TaskTokenizer
    from softprompt.evaluate import label_scores
    from softprompt.initializers import initialize
    from softprompt.train import TrainConfig, batch_for_step, make_optimizer, make_schedule, prompt_loss

    backbone = load_model("smollm2-135m")
    dataset = load_dataset("rotten-tomatoes")
    task_tokenizer = TaskTokenizer(backbone, dataset.task)
    train_items = task_tokenizer.encode_all(dataset.train)
    valid_items = task_tokenizer.encode_all(dataset.validation[: args.valid])
    gold = torch.tensor([item.label for item in valid_items])
    label_tokens = torch.tensor([ids[0] for ids in task_tokenizer.label_ids])
    config = TrainConfig(steps=args.steps)

    def ours_accuracy(prompt: torch.Tensor) -> float:
        scores = label_scores(backbone, task_tokenizer, valid_items, prompt.detach().unsqueeze(0))
        return float((scores.argmax(1) == gold).float().mean())

    def run_ours() -> list[dict]:
        prompt = torch.nn.Parameter(initialize("class-label", backbone, 20, dataset.task, seed=0))
        optimizer = make_optimizer(config, [prompt])
        schedule = make_schedule(config, optimizer)

        def step(index: int) -> None:
            items = [train_items[i] for i in batch_for_step(train_items, config, index)]
            loss = prompt_loss(backbone, task_tokenizer, items, {"prompts": prompt.unsqueeze(0)})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

        return curve(step, lambda: ours_accuracy(prompt))

    peft_model = get_peft_model(backbone.model, PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20, prompt_tuning_init=PromptTuningInit.RANDOM))

    def peft_batch(items, with_label: bool):
        rows = [item.input_ids + (item.target_ids[:1] if with_label else []) for item in items]
        width = max(map(len, rows))
        ids = torch.tensor([row + [backbone.pad_id] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return ids, mask, [len(row) for row in rows]

    @torch.no_grad()
    def peft_accuracy() -> float:
        correct = 0
        for start in range(0, len(valid_items), 32):
            items = valid_items[start : start + 32]
            ids, mask, lengths = peft_batch(items, with_label=False)
            with backbone.autocast():
                logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
            last = logits[torch.arange(len(items)), torch.tensor(lengths) + 20 - 1]  # + virtual tokens
            predicted = last[:, label_tokens].argmax(1)
            correct += int((predicted == gold[start : start + len(items)]).sum())
        return correct / len(valid_items)

    def run_peft() -> list[dict]:
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

        def step(index: int) -> None:
            items = [train_items[i] for i in batch_for_step(train_items, config, index)]
            ids, mask, lengths = peft_batch(items, with_label=True)
            labels = torch.full_like(ids, -100)
            labels[torch.arange(len(items)), torch.tensor(lengths) - 1] = ids[torch.arange(len(items)),
                                                                               torch.tensor(lengths) - 1]
            with backbone.autocast(), lean_backward.disabled():  # PEFT's own backward
                loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return curve(step, peft_accuracy)

    def curve(step, accuracy) -> list[dict]:
        points, trained = [{"step": 0, "train_s": 0.0, "valid_accuracy": accuracy()}], 0.0
        for index in range(args.steps):
            started = time.perf_counter()
            step(index)
            trained += time.perf_counter() - started
            if (index + 1) % args.eval_every == 0:
                points.append({"step": index + 1, "train_s": round(trained, 1), "valid_accuracy": accuracy()})
                print(points[-1], flush=True)
        return points

    with peft_model.disable_adapter():  # softprompt runs the same frozen weights without PEFT's prompt
        ours = run_ours()
    peft = run_peft()

    def reached(points: list[dict]) -> float | None:
        return next((p["train_s"] for p in points if p["valid_accuracy"] >= args.target), None)

    print(f"{'step':>5} {'ours s':>8} {'ours acc':>9} {'PEFT s':>8} {'PEFT acc':>9}")
    for a, b in zip(ours, peft):
        print(f"{a['step']:>5} {a['train_s']:>8} {a['valid_accuracy']:>9.3f} {b['train_s']:>8} "
              f"{b['valid_accuracy']:>9.3f}")
    ours_s, peft_s = reached(ours), reached(peft)
    print(json.dumps({"target": args.target, "ours_s": ours_s, "peft_s": peft_s,
                      "speedup": round(peft_s / ours_s, 2) if ours_s and peft_s else None,
                      "ours_best": max(p["valid_accuracy"] for p in ours),
                      "peft_best": max(p["valid_accuracy"] for p in peft)}))


if __name__ == "__main__":
    main()
