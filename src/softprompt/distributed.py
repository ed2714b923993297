"""Multi-process training with torch.distributed: gloo on CPU, nccl on CUDA.

Launched by `torchrun --nproc-per-node N -m softprompt train ...` (or `softprompt train --devices N`, which runs
torchrun for you). Every process holds the frozen model and the same prompt; each step's global batch is split
across processes, and only the prompt's gradient is all-reduced — the data-parallel rule DDP applies, done
directly on the one trainable tensor (DDP's bucketing has nothing to bucket). The result equals one process with the
same global batch, up to float summation order.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from .errors import SoftPromptError


def init_from_environment() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        # N processes share the cores: one process each taking every core would oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        dist.init_process_group("gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This process's share of a list that every process holds in the same order."""
    return items[rank() :: world_size()]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def launch(devices: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `devices` processes; returns its exit code."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    kind = "CUDA devices" if torch.cuda.is_available() else "CPU cores"
    if devices > available:
        raise SoftPromptError(f"--devices {devices}: this machine has {available} {kind}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
               "-m", "softprompt", *argv]
    return subprocess.run(command).returncode


def without_devices_option(argv: list[str]) -> list[str]:
    """`argv` less its `--devices N` / `--devices=N`: the command line each torchrun process runs."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--devices":
            skip_value = True
        elif not arg.startswith("--devices="):
            kept.append(arg)
    return kept


def launch_command(devices: int, argv: list[str]) -> int:
    """Re-run the command line `argv` (e.g. sys.argv[1:]) under torchrun with `devices` processes, each without
    `--devices` (or they would launch again); returns torchrun's exit code."""
    return launch(devices, without_devices_option(argv))
