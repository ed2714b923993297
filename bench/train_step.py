"""One prompt-tuning training step, softprompt vs PEFT, on the same frozen model, batch and prompt length.

    python bench/train_step.py --config cpu-smollm2-k20          # one configuration
    python bench/train_step.py --config all-cpu                  # cpu-smollm2-k20 and cpu-smollm2-k100
    python bench/train_step.py --config cuda-1b-k100 --profile   # where each method's step time goes
    python bench/train_step.py --config all-cpu --ours-path two-pass   # softprompt's earlier two-pass training step
    python bench/train_step.py --config cpu-overhead-k20 --steps 30      # host (dispatch) overhead per step only
    python bench/train_step.py --config all-cpu --transformers-backward  # softprompt without lean_backward.py
    python bench/train_step.py --config cuda-1b-k100 --lean-ab   # with vs without lean_backward.py, one process
    python bench/train_step.py --config cuda-1b-k100 --compile --peft-eager   # ours compiled vs PEFT as it ships
    python bench/train_step.py --config all-cpu --activation-checkpointing     # both methods checkpointed

Timing: both methods in one process, alternating step by step after warm-up; median ms/step.
Memory: CUDA: torch.cuda.max_memory_allocated over each method's steps, after the timing in the same process (peak
reset before each method; the other method's activations are freed by then, so a compiled model compiles once).
With CUDA graphs (`--compile-mode reduce-overhead`) the graphs' memory lives in pools that max_memory_allocated does
not see at replay, so each method runs in its own process and its peak RESERVED memory counts (cache emptied first).
CPU: each method in a fresh subprocess, a thread sampling RSS every 2 ms; peak RSS during the steps minus RSS just
before them (the activation + gradient memory the step adds on top of the loaded model).
Both compute the same loss: negative log-likelihood of the label token after prompt + input. PEFT runs the model
with `labels` (full [B, T, V] logits); softprompt computes the prompt's keys/values once per batch and the LM head
only at the label position. Ends with one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from peak_rss import PeakRSS
from random_models import LLAMA_SHAPES, random_llama, stub_tokenizer

CONFIGS = {
    "cpu-smollm2-k20": dict(device="cpu", model="smollm2-135m", batch=8, prompt_length=20),
    "cpu-smollm2-k100": dict(device="cpu", model="smollm2-135m", batch=8, prompt_length=100),
    # host overhead only (see random_models.llama-1b-narrow): what the GPU runs below are bound by, on a CPU
    "cpu-overhead-k20": dict(device="cpu", model="llama-1b-narrow", batch=2, seq=8, prompt_length=20),
    "cuda-1b-k20": dict(device="cuda", model="llama-1b", batch=32, seq=128, prompt_length=20),
    "cuda-1b-k100": dict(device="cuda", model="llama-1b", batch=32, seq=128, prompt_length=100),
    "cuda-3b-k100": dict(device="cuda", model="llama-3b", batch=16, seq=256, prompt_length=100),
}
GROUPS = {"all-cpu": ["cpu-smollm2-k20", "cpu-smollm2-k100"],
          "all-cuda": ["cuda-1b-k20", "cuda-1b-k100", "cuda-3b-k100"]}


OURS_PATHS = ("packed", "two-pass", "cache-object")


@dataclass(frozen=True)
class Variant:
    """`compile`: torch.compile the decoder layers (both methods; `peft_eager`: PEFT runs them eagerly, as it ships,
    the comparison behind issue #3's reference figures). `ours_path`: how softprompt hands the prompt to
    attention: "packed" (prompt and tokens in one pass, the default), "two-pass" (the prompt's keys/values from a
    separate batch-1 pass, as plain tensors) or "cache-object" (the same, in a transformers DynamicCache).
    `checkpointing`: both methods recompute each layer's activations in the backward pass (transformers'
    checkpointing on the shared model, as `softprompt train --activation-checkpointing` and PEFT users enable it)."""

    compile: bool = False
    ours_path: str = "packed"
    compile_mode: str | None = None  # torch.compile's mode, e.g. "reduce-overhead" (CUDA graphs)
    lean: bool = True  # False: softprompt with transformers' own backward (lean_backward.disabled())
    peft_eager: bool = False
    checkpointing: bool = False

    def arguments(self) -> list[str]:
        return [*(["--compile"] if self.compile else []), *(["--compile-mode", self.compile_mode]
                                                            if self.compile_mode else []),
                "--ours-path", self.ours_path, *([] if self.lean else ["--transformers-backward"]),
                *(["--peft-eager"] if self.peft_eager else []),
                *(["--activation-checkpointing"] if self.checkpointing else [])]

    @property
    def cuda_graphs(self) -> bool:
        return self.compile and self.compile_mode == "reduce-overhead"

    def suffix(self) -> str:
        compiled = "+compile" + (f"-{self.compile_mode}" if self.compile_mode else "") if self.compile else ""
        return (compiled + ("" if self.ours_path == "packed" else f"+{self.ours_path}")
                + ("" if self.lean else "+transformers-backward") + ("+peft-eager" if self.peft_eager else "")
                + ("+checkpointing" if self.checkpointing else ""))


@dataclass
class Setup:
    backbone: object  # softprompt CausalLM
    peft_model: object
    ours_step: object
    peft_step: object
    tokens_per_step: int


def build(name: str, variant: Variant = Variant(), device: str | None = None, **shape_overrides) -> Setup:
    """`device` and `shape_overrides` (a random model's config fields, e.g. its depth) change the configuration
    (bench/saved_activations.py runs GPU shapes on the CPU)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from softprompt import lean_backward
    from softprompt.backbone import TokenBatch
    from softprompt.causal import CausalLM
    from softprompt.loader import load_model

    spec = CONFIGS[name]
    device = torch.device(device or spec["device"])
    if spec["model"] in LLAMA_SHAPES:
        model = random_llama(spec["model"], device, **shape_overrides)
        config = model.config
        tokenizer = stub_tokenizer(config.vocab_size)
        backbone = CausalLM(model, tokenizer, spec["model"], precision="fp32")  # weights already bf16
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(10, config.vocab_size, (spec["batch"], spec["seq"]), generator=generator)
        lengths = torch.full((spec["batch"],), spec["seq"])
        targets = torch.randint(10, config.vocab_size, (spec["batch"],), generator=generator)
    else:
        from softprompt.data import TaskTokenizer, load_dataset

        backbone = load_model(spec["model"], precision="auto")
        dataset = load_dataset("rotten-tomatoes")
        task_tokenizer = TaskTokenizer(backbone, dataset.task)
        items = task_tokenizer.encode_all(dataset.train[: spec["batch"]])
        width = max(len(item.input_ids) for item in items)
        ids = torch.tensor([item.input_ids + [backbone.pad_id] * (width - len(item.input_ids)) for item in items])
        lengths = torch.tensor([len(item.input_ids) for item in items])
        targets = torch.tensor([item.target_ids[0] for item in items])
    model = backbone.model
    if variant.compile:  # in place: PEFT runs the same compiled layers, so the comparison stays like for like
        backbone.compile(variant.compile_mode)
    rows = torch.arange(len(lengths))
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
    batch = TokenBatch(ids, mask, rows, lengths - 1, targets)

    # PEFT's sequence: input + label token, loss only on the label token (labels -100 elsewhere).
    peft_ids = torch.cat([ids, torch.full((len(ids), 1), backbone.pad_id)], 1)
    peft_ids[rows, lengths] = targets
    peft_mask = (torch.arange(peft_ids.shape[1]).unsqueeze(0) <= lengths.unsqueeze(1)).long()
    labels = torch.full_like(peft_ids, -100)
    labels[rows, lengths] = targets
    peft_ids, peft_mask, labels = peft_ids.to(device), peft_mask.to(device), labels.to(device)

    length = spec["prompt_length"]
    prompt = torch.nn.Parameter(torch.randn(length, backbone.d_model, device=device) * 0.1)
    ours_optimizer = torch.optim.AdamW([prompt], lr=1e-3)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=length,
                                                          prompt_tuning_init=PromptTuningInit.RANDOM))
    peft_optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    backbone.takes_plain_prompt_tensors = backbone.takes_plain_prompt_tensors and variant.ours_path != "cache-object"

    def checkpointing() -> contextlib.AbstractContextManager:
        return backbone.activation_checkpointing() if variant.checkpointing else contextlib.nullcontext()

    def ours_step() -> float:
        prompts = prompt.unsqueeze(0)
        with contextlib.nullcontext() if variant.lean else lean_backward.disabled(), checkpointing():
            cache = None if variant.ours_path == "packed" else backbone.prompt_cache(prompts)
            loss = -backbone.target_logprobs(batch, prompts, cache=cache).mean()
            ours_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        ours_optimizer.step()
        return loss.item()

    def peft_step() -> float:
        # same precision as ours; no cache object, which training never reads; PEFT's own activations
        eager = torch.compiler.set_stance("force_eager") if variant.peft_eager else contextlib.nullcontext()
        with backbone.autocast(), lean_backward.disabled(), eager, checkpointing():
            loss = peft_model(input_ids=peft_ids, attention_mask=peft_mask, labels=labels, use_cache=False).loss
            peft_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        peft_optimizer.step()
        return loss.item()

    return Setup(backbone, peft_model, ours_step, peft_step, int(lengths.sum()))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(step_functions: dict, steps: int, warmup: int, device: str) -> dict:
    """Median ms/step of each step function, run in turn after warm-up so that drift affects all alike."""
    timings = {name: [] for name in step_functions}
    for index in range(warmup + steps):
        for name, step in step_functions.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if index >= warmup:
                timings[name].append((time.perf_counter() - start) * 1000)
            elif index == 0:  # includes compilation with --compile
                print(f"  {name}: first step {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {name: statistics.median(values) for name, values in timings.items()}


def time_steps(name: str, steps: int, warmup: int, variant: Variant = Variant(), blocked: bool = False) -> dict:
    """`blocked`: all of PEFT's steps, then all of ours, instead of alternating (to see what alternating costs)."""
    setup = build(name, variant)
    methods, device = {"peft": setup.peft_step, "ours": setup.ours_step}, CONFIGS[name]["device"]
    if blocked:
        result = {}
        for method, step in methods.items():
            result.update(alternate({method: step}, steps, warmup, device))
    else:
        result = alternate(methods, steps, warmup, device)
    result["tokens_per_step"] = setup.tokens_per_step
    return result, setup


def lean_ab(name: str, steps: int, warmup: int) -> dict:
    """softprompt's step with lean_backward.py vs with transformers' own backward, in one process (no PEFT)."""
    from softprompt import lean_backward

    setup = build(name)
    device = CONFIGS[name]["device"]

    def transformers_step() -> float:
        with lean_backward.disabled():
            return setup.ours_step()

    steps_by_name = {"lean": setup.ours_step, "transformers": transformers_step}
    result = {"config": name, **{f"{key}_ms": round(value, 1)
                                 for key, value in alternate(steps_by_name, steps, warmup, device).items()}}
    if device == "cuda":
        result.update({f"{key}_peak_mib": round(cuda_peak_mib(step, 3)) for key, step in steps_by_name.items()})
    return result


def cuda_peak_mib(step, steps: int, reserved: bool = False) -> float:
    """`reserved`: the allocator's reserved bytes instead of the live tensors' (CUDA graphs keep their memory in a
    pool that live-tensor counting does not see at replay); cached blocks are released first."""
    step()
    torch.cuda.synchronize()
    if reserved:
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**20


def peak_memory_mib(name: str, method: str, steps: int, variant: Variant = Variant()) -> float:
    """Extra memory a method's steps need on top of the loaded model (see module docstring)."""
    setup = build(name, variant)
    step = setup.ours_step if method == "ours" else setup.peft_step
    if CONFIGS[name]["device"] == "cuda":
        return cuda_peak_mib(step, steps, reserved=variant.cuda_graphs)
    with PeakRSS() as peak:
        for _ in range(steps):
            step()
    return peak.mib


def profile(name: str, steps: int, warmup: int, variant: Variant = Variant(), top: int = 20) -> None:
    """torch.profiler over each method's steps: the operators that take the time (device time on CUDA), and how much
    of the step the host spends launching work (the device idles when host time exceeds device time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    setup = build(name, variant)
    device = CONFIGS[name]["device"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for method in ("peft", "ours"):
        step = setup.ours_step if method == "ours" else setup.peft_step
        for _ in range(warmup):
            step()
        sync(device)
        with run_profiler(activities=activities) as profiler:
            for _ in range(steps):
                step()
            sync(device)
        events = profiler.key_averages()
        host_ms = sum(event.self_cpu_time_total for event in events) / 1000 / steps
        device_ms = sum(event.self_device_time_total for event in events  # kernels only, as torch's own total
                        if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1000 / steps
        operators = sum(event.count for event in events if event.key.startswith("aten::")) / steps
        print(f"== {name} {method}: host {host_ms:.1f} ms/step, device kernels {device_ms:.1f} ms/step, "
              f"{operators:.0f} aten operators/step", file=sys.stderr)
        print(events.table(sort_by=sort_key, row_limit=top, max_name_column_width=60), file=sys.stderr)


def run_config(name: str, steps: int, warmup: int, variant: Variant = Variant(), blocked: bool = False) -> dict:
    if CONFIGS[name]["device"] == "cuda":  # peaks count every live tensor: the previous configuration's must be gone
        gc.collect()
        if torch.cuda.memory_allocated():
            print(f"  warning: {torch.cuda.memory_allocated() / 2**20:.0f} MiB still allocated before {name}; "
                  f"its peaks include them", file=sys.stderr)
    timing, setup = time_steps(name, steps, warmup, variant, blocked)
    if CONFIGS[name]["device"] == "cuda" and not variant.cuda_graphs:
        memory = {"peft": cuda_peak_mib(setup.peft_step, 3), "ours": cuda_peak_mib(setup.ours_step, 3)}
    else:  # each method in its own process (CUDA graphs: one method's graph pools would count in the other's)
        del setup
        gc.collect()
        memory = {}
        for method in ("peft", "ours"):
            command = [sys.executable, __file__, "--config", name, "--memory-of", method, "--steps", "3",
                       *variant.arguments()]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            memory[method] = json.loads(output.strip().splitlines()[-1])["peak_mib"]
    tokens = timing["tokens_per_step"]
    return {
        "config": name + variant.suffix() + ("+blocked" if blocked else ""),
        "peft_ms": round(timing["peft"], 1),
        "ours_ms": round(timing["ours"], 1),
        "speedup": round(timing["peft"] / timing["ours"], 2),
        "peft_tokens_per_s": round(tokens / timing["peft"] * 1000),
        "ours_tokens_per_s": round(tokens / timing["ours"] * 1000),
        "peft_peak_mib": round(memory["peft"]),
        "ours_peak_mib": round(memory["ours"]),
        "memory_ratio": round(memory["ours"] / memory["peft"], 3),
        **({"memory_counted": "reserved, one process per method"}
           if variant.cuda_graphs and CONFIGS[name]["device"] == "cuda" else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=[*CONFIGS, *GROUPS])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decoder layers (CausalLM.compile; both methods)")
    parser.add_argument("--compile-mode", help="with --compile: torch.compile's mode, e.g. reduce-overhead")
    parser.add_argument("--peft-eager", action="store_true",
                        help="with --compile: PEFT runs the layers eagerly (as it ships); softprompt compiled")
    parser.add_argument("--ours-path", choices=OURS_PATHS, default="packed",
                        help="how softprompt runs the prompt (see Variant); the default is the library's training path")
    parser.add_argument("--transformers-backward", action="store_true",
                        help="softprompt without lean_backward (the activations transformers keeps), for the A/B")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per method instead")
    parser.add_argument("--blocked", action="store_true",
                        help="time all of PEFT's steps, then all of ours (default: alternating step by step)")
    parser.add_argument("--lean-ab", action="store_true",
                        help="softprompt with and without lean_backward in one process instead (ms/step; CUDA: peak)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="both methods recompute each layer's activations in the backward pass")
    parser.add_argument("--memory-of", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peft_eager and not args.compile:
        parser.error("--peft-eager compares against softprompt compiled: add --compile")
    variant = Variant(args.compile, args.ours_path, args.compile_mode, lean=not args.transformers_backward,
                      peft_eager=args.peft_eager, checkpointing=args.activation_checkpointing)
    if args.memory_of:
        print(json.dumps({"peak_mib": peak_memory_mib(args.config, args.memory_of, args.steps, variant)}))
        return
    names = GROUPS.get(args.config, [args.config])
    if args.profile:
        for name in names:
            profile(name, args.steps, args.warmup, variant)
        return
    if args.lean_ab:
        for name in names:
            print(json.dumps(lean_ab(name, args.steps, args.warmup)))
        return
    results = []
    for name in names:
        print(f"== {name}: {CONFIGS[name]}", file=sys.stderr)
        results.append(run_config(name, args.steps, args.warmup, variant, args.blocked))
        r = results[-1]
        print(f"{name}: PEFT {r['peft_ms']} ms/step, ours {r['ours_ms']} ms/step -> {r['speedup']}x faster; "
              f"peak {r['peft_peak_mib']} vs {r['ours_peak_mib']} MiB -> {r['memory_ratio']}x memory",
              file=sys.stderr)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
