"""Greedy generation with a soft prompt: softprompt vs PEFT on the same frozen model and the same prompt.

    python bench/generation.py                     # real smollm2-135m, real GSM8K questions
    python bench/generation.py --precision fp32    # the token-for-token comparison without bf16 rounding
    python bench/generation.py --prompts 8         # also: 8 prompts, mixed batches vs one prompt per batch

The same K=20 prompt (vocab-initialised) is loaded into both: PEFT's `PromptTuningConfig` model (its prompt
encoder's weights set to ours) generates with transformers' `generate` (greedy, left-padded batches, as `generate`
wants); softprompt with `CausalLM.generate` (greedy, right-padded batches, the prompt's keys/values computed once).
Each runs in length-sorted batches of `--batch` and one input at a time (softprompt's way before batching). Up to
`--max-new-tokens` per input; EOS ends an answer. Prints seconds, tokens/s and the ratio to PEFT's batched run, and
how many answers equal, token for token, PEFT's one-at-a-time answers (an input alone has no padding, so those are
the reference). With `--prompts N` (N > 1), the inputs are spread round-robin over N prompts (vocab-initialised
with different seeds; PEFT serves one prompt per model, so it sits this part out): softprompt decodes them in
mixed batches (each row after its own prompt, as the server's /v1/generate does) and, as the baseline, in batches
of one prompt each; answers are compared token for token. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=1, help="N > 1: also mixed vs one-prompt-per-batch decoding")
    args = parser.parse_args()

    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from softprompt import load_dataset, load_model
    from softprompt.backbone import PromptCache
    from softprompt.data import TaskTokenizer
    from softprompt.evaluate import length_sorted_batches
    from softprompt.initializers import initialize

    backbone = load_model(args.model, precision=args.precision)
    if backbone.bos_ids:
        raise SystemExit("this comparison assumes no BOS (PEFT puts the prompt before it, softprompt after)")
    data = load_dataset("gsm8k")
    task_tokenizer = TaskTokenizer(backbone, data.task)
    items = task_tokenizer.encode_all((data.test or data.valid)[: args.inputs])
    rows = [item.input_ids for item in items]
    prompt = initialize("vocab", backbone, 20, data.task, seed=0)
    eos = backbone.tokenizer.eos_token_id

    peft_model = get_peft_model(backbone.model, PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.shape[0], prompt_tuning_init=PromptTuningInit.RANDOM))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    prefix = backbone.prompt_cache(prompt.unsqueeze(0))

    def peft_generate(indices: list[int]) -> list[list[int]]:
        width = max(len(rows[i]) for i in indices)
        ids = torch.tensor([[backbone.pad_id] * (width - len(rows[i])) + rows[i] for i in indices])
        lengths = torch.tensor([len(rows[i]) for i in indices])
        mask = (torch.arange(width) >= width - lengths.unsqueeze(1)).long()  # left padding, as generate wants
        with torch.no_grad(), backbone.autocast():
            output = peft_model.generate(input_ids=ids.to(backbone.device), attention_mask=mask.to(backbone.device),
                                         max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                         eos_token_id=eos, pad_token_id=backbone.pad_id)
        return [tokens[: tokens.index(eos)] if eos in tokens else tokens for tokens in output[:, width:].tolist()]

    def ours_generate(indices: list[int]) -> list[list[int]]:
        return backbone.generate([rows[i] for i in indices], prefix, args.max_new_tokens, {eos})

    def way(generate, batched: bool):
        def run() -> list[list[int]]:
            answers: list[list[int]] = [[] for _ in rows]
            for indices in length_sorted_batches(items, args.batch) if batched else [[i] for i in range(len(rows))]:
                for index, tokens in zip(indices, generate(indices)):
                    answers[index] = tokens
            return answers
        return run

    ways = {"peft": way(peft_generate, True), "ours": way(ours_generate, True),
            "peft_one_at_a_time": way(peft_generate, False), "ours_one_at_a_time": way(ours_generate, False)}
    ways["peft"](), ways["ours"]()  # warm-up
    seconds, answers = {}, {}
    for name, run in ways.items():
        started = time.perf_counter()
        answers[name] = run()
        seconds[name] = time.perf_counter() - started
    # an input alone has no padding: the reference every batched answer should reproduce
    reference = answers["peft_one_at_a_time"]
    agree = {name: sum(a == b for a, b in zip(reference, result)) for name, result in answers.items()}
    print(f"{args.model}, precision {backbone.precision}, {len(rows)} GSM8K questions ({min(map(len, rows))}-"
          f"{max(map(len, rows))} tokens), K=20, batches of {args.batch}, up to {args.max_new_tokens} new tokens")
    for name in ways:
        produced = sum(map(len, answers[name]))
        print(f"{name:20s} {seconds[name]:7.1f} s  {produced / seconds[name]:7.1f} tokens/s  "
              f"{seconds['peft'] / seconds[name]:5.2f}x PEFT batched  answers equal to PEFT's one at a time: "
              f"{agree[name]}/{len(rows)}")
    result = {"model": args.model, "precision": backbone.precision, "inputs": len(rows), "batch": args.batch,
              **{f"{name}_s": round(value, 2) for name, value in seconds.items()},
              "speedup_vs_peft": round(seconds["peft"] / seconds["ours"], 3),
              "batched_vs_one_at_a_time": round(seconds["ours_one_at_a_time"] / seconds["ours"], 3),
              **{f"{name}_equal": value for name, value in agree.items()}}

    if args.prompts > 1:
        stacked = PromptCache.stack([backbone.prompt_cache(initialize("vocab", backbone, 20, data.task,
                                                                            seed=seed).unsqueeze(0))
                                     for seed in range(args.prompts)])
        owner = [i % args.prompts for i in range(len(rows))]

        def decode(groups: list[list[int]]) -> list[list[int]]:
            answers: list[list[int]] = [[] for _ in rows]
            for group in groups:
                for indices in length_sorted_batches([items[i] for i in group], args.batch):
                    chosen = [group[i] for i in indices]
                    generated = backbone.generate([rows[i] for i in chosen], stacked, args.max_new_tokens, {eos},
                                                  [owner[i] for i in chosen])
                    for index, tokens in zip(chosen, generated):
                        answers[index] = tokens
            return answers

        per_prompt = [[i for i in range(len(rows)) if owner[i] == p] for p in range(args.prompts)]
        decode([list(range(len(rows)))])  # warm-up
        for name, groups in (("mixed", [list(range(len(rows)))]), ("one_prompt_per_batch", per_prompt)):
            started = time.perf_counter()
            answers[name] = decode(groups)
            seconds[name] = time.perf_counter() - started
        equal = sum(a == b for a, b in zip(answers["mixed"], answers["one_prompt_per_batch"]))
        print(f"{args.prompts} prompts, inputs round-robin: mixed batches {seconds['mixed']:.1f} s, one prompt per "
              f"batch {seconds['one_prompt_per_batch']:.1f} s -> "
              f"{seconds['one_prompt_per_batch'] / seconds['mixed']:.2f}x; answers equal: {equal}/{len(rows)}")
        result.update({"prompts": args.prompts, "mixed_s": round(seconds["mixed"], 2),
                       "one_prompt_per_batch_s": round(seconds["one_prompt_per_batch"], 2),
                       "mixed_vs_one_prompt_per_batch": round(seconds["one_prompt_per_batch"] / seconds["mixed"], 3),
                       "mixed_equal": equal})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
