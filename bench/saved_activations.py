"""What one training step keeps for its backward pass, per decoder layer: PEFT vs softprompt, no GPU needed.

    python bench/saved_activations.py --config cuda-1b-k100      # the GPU shapes, counted on the CPU
    python bench/saved_activations.py --config cpu-smollm2-k20

Activation memory is most of a prompt-tuning step's memory beyond the weights, and it does not depend on the
device: every tensor autograd keeps passes through `torch.autograd.graph.saved_tensors_hooks`, where its storage
is counted once (weights excluded). Random-weight shapes are built with 1 and with 2 decoder layers (same batch,
real width, small vocabulary): the difference is exactly one layer's share, reported per layer and times the
shape's depth. Real models (smollm2) are counted whole, embedding and head included. Methods: PEFT's prompt
tuning, softprompt with transformers' own backward (train_step.py's `--transformers-backward`) and softprompt as
it runs (lean_backward.py). Left out: the SDPA backend's own choice of saved tensors (CUDA flash keeps the same
query, key, value, output and log-sum-exp as the CPU kernel) and, for the GPU shapes, the LM head (PEFT keeps
[rows, K + T, vocab] logits).
"""

from __future__ import annotations

import argparse
import json

import torch
from random_models import LLAMA_SHAPES
from train_step import CONFIGS, Variant, build

METHODS = ("peft", "ours-transformers-backward", "ours")


def variant(method: str) -> Variant:
    return Variant(lean=method != "ours-transformers-backward")


def kept_bytes(setup, method: str) -> int:
    """Bytes of the distinct non-weight storages autograd saves during one training step of `method`."""
    weights = {p.untyped_storage().data_ptr() for p in setup.peft_model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        (setup.peft_step if method == "peft" else setup.ours_step)()
    return sum(kept.values())


def count(name: str) -> dict:
    spec = CONFIGS[name]
    mib = 2**20
    if spec["model"] in LLAMA_SHAPES:
        depth = LLAMA_SHAPES[spec["model"]]["num_hidden_layers"]
        per_layer = {}
        for method in METHODS:
            one, two = (kept_bytes(build(name, variant(method), device="cpu", num_hidden_layers=layers,
                                         vocab_size=4096), method) for layers in (1, 2))
            per_layer[method] = (two - one) / mib
            print(f"{name} {method:>27}: {per_layer[method]:8.1f} MiB per layer")
        totals = {method: value * depth for method, value in per_layer.items()}
        scope = f"decoder layers only, {depth} layers"
    else:
        totals = {method: kept_bytes(build(name, variant(method)), method) / mib for method in METHODS}
        scope = "whole step"
    for method in METHODS:
        print(f"{name} {method:>27}: {totals[method]:9.1f} MiB ({scope})")
    return {"config": name, "scope": scope, **{f"{m}_mib": round(totals[m], 1) for m in METHODS},
            "ours_vs_peft": round(totals["ours"] / totals["peft"], 3),
            "lean_vs_transformers": round(totals["ours"] / totals["ours-transformers-backward"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cuda-1b-k100", choices=sorted(CONFIGS))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(count(args.config)))


if __name__ == "__main__":
    main()
