"""Compiled layers give the eager numbers on the device at hand, over the varying batch shapes of a training run.

    python bench/compile_check.py --device cuda --shape llama-1b --layers 4 --modes default,reduce-overhead
    python bench/compile_check.py --device cpu --shape llama-tiny --modes default      # plumbing only

softprompt's packed training pass (scores of the target tokens and the prompt gradient) runs eagerly, then with
`CausalLM.compile(mode)`, on batches of different lengths with several prompts mixed in each. The test suite
checks this on tiny CPU models (tests/test_backbone.py); this runs it where CUDA graphs exist
(`--compile-mode reduce-overhead` replays a graph per layer and records one per batch shape). bf16 weights, so
compiled kernels (fused, other summation orders) differ from eager ones by rounding: the largest differences are
printed next to the tolerance, with ms per batch eager and compiled (after compiling). One JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from random_models import LLAMA_SHAPES, random_llama, stub_tokenizer

from softprompt.backbone import TokenBatch
from softprompt.causal import CausalLM

PROMPTS, PROMPT_LENGTH = 3, 20
TOLERANCE = 0.05  # largest score difference, and gradient difference relative to the gradient's largest entry


def token_batches(vocab_size: int, rows: int, lengths: list[int], generator: torch.Generator) -> list[TokenBatch]:
    """Right-padded random rows, each batch's longest row `length` long, the others shorter."""
    batches = []
    for length in lengths:
        row_lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
        row_lengths[0] = length
        ids = torch.randint(10, vocab_size, (rows, length), generator=generator)
        mask = (torch.arange(length).unsqueeze(0) < row_lengths.unsqueeze(1)).long()
        targets = torch.randint(10, vocab_size, (rows,), generator=generator)
        batches.append(TokenBatch(ids * mask, mask, torch.arange(rows), row_lengths - 1, targets))
    return batches


def scores_and_gradients(backbone: CausalLM, prompts: torch.Tensor, prompt_index: torch.Tensor,
                         batches: list[TokenBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    results = []
    for batch in batches:
        trainable = prompts.clone().requires_grad_(True)
        logprobs = backbone.target_logprobs(batch, trainable, prompt_index)
        (gradient,) = torch.autograd.grad(-logprobs.sum(), trainable)
        results.append((logprobs.detach().float().clone(), gradient.float().clone()))  # not graph-owned memory
    return results


def timed(function, *args):
    """(result, seconds), the device's queue drained before and after."""
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    result = function(*args)
    synchronize()
    return result, time.perf_counter() - start


def check(mode: str, args: argparse.Namespace) -> dict:
    model = random_llama(args.shape, args.device, num_hidden_layers=args.layers)
    backbone = CausalLM(model, stub_tokenizer(model.config.vocab_size), args.shape, precision="fp32")  # bf16 weights
    generator = torch.Generator().manual_seed(0)
    batches = token_batches(model.config.vocab_size, args.rows, args.lengths, generator)
    prompts = (torch.randn(PROMPTS, PROMPT_LENGTH, backbone.d_model, generator=generator) * 0.1).to(args.device)
    prompt_index = torch.randint(0, PROMPTS, (args.rows,), generator=generator)

    scores_and_gradients(backbone, prompts, prompt_index, batches)  # warm-up
    eager, eager_s = timed(scores_and_gradients, backbone, prompts, prompt_index, batches)
    backbone.compile(None if mode == "default" else mode)
    _, first_pass_s = timed(scores_and_gradients, backbone, prompts, prompt_index, batches)  # compiles, records
    compiled, compiled_s = timed(scores_and_gradients, backbone, prompts, prompt_index, batches)  # replays
    score_difference = max((a - b).abs().max().item() for (a, _), (b, _) in zip(eager, compiled))
    gradient_difference = max(((a - b).abs().max() / a.abs().max()).item() for (_, a), (_, b) in zip(eager, compiled))
    return {"mode": mode, "device": args.device, "shape": args.shape, "layers": args.layers,
            "batch_lengths": args.lengths, "max_score_difference": round(score_difference, 5),
            "max_relative_gradient_difference": round(gradient_difference, 5),
            "within_tolerance": score_difference <= TOLERANCE and gradient_difference <= TOLERANCE,
            "first_compiled_pass_s": round(first_pass_s, 1),
            "eager_ms_per_batch": round(eager_s / len(batches) * 1000, 1),
            "compiled_ms_per_batch": round(compiled_s / len(batches) * 1000, 1)}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="llama-1b", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (they share one compiled graph)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--lengths", type=lambda text: [int(x) for x in text.split(",")], default=[37, 64, 23],
                        help="each batch's longest row, comma-separated")
    parser.add_argument("--modes", default="default,reduce-overhead")
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        results.append(check(mode, args))
        print(f"{mode}: {results[-1]}", file=sys.stderr)
    for result in results:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
