"""Hugging Face checkpoint directories: lazy reading, atomic sharded writing.

    source = HFCheckpoint("Qwen3-4B")                       # nothing loaded yet
    tensor = source.get("model.norm.weight")                # one tensor, memory-mapped
    write_hf_checkpoint("out", iter_hf_weights(...), source.config, tokenizer_from=source.path)

The writer streams tensors into safetensors shards of at most `shard_bytes` plus
model.safetensors.index.json, config.json and the tokenizer files, all inside a temporary
directory beside `out` that is renamed into place only when everything is written. An existing
`out` is refused unless force=True (then replaced only after the new one is complete); a failure
leaves no output and no temporary directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class HFCheckpoint:
    """A HF model directory; tensors are read one at a time from their safetensors shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{self.path}: not a Hugging Face checkpoint (no config.json)")
        self.config: dict[str, Any] = json.loads(config.read_text())
        self._files = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index ({err})") from None
            return {name: self.path / file for name, file in weight_map.items()}
        single = self.path / SINGLE
        if not single.is_file():
            raise FileNotFoundError(f"{self.path}: no {SINGLE} or {INDEX}")
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)

    def names(self) -> list[str]:
        return list(self._files)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"{self.path}: checkpoint has no tensor {name!r}")
        with safe_open(self._files[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{self.path}: tensor {name!r} has dtype {tensor.dtype}; supported: "
                f"{[str(d) for d in SUPPORTED_DTYPES]}"
            )
        return tensor


def write_hf_checkpoint(
    out: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    tokenizer_from: str | Path | None = None,
    shard_bytes: int = 5 * 2**30,
    force: bool = False,
) -> Path:
    """Write a HF checkpoint directory atomically (see the module docstring); returns `out`."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_shards(staging, tensors, shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_from) / name
                if source.is_file():
                    shutil.copy2(source, staging / name)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_shards(
    directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int
) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], directory / name, metadata={"format": "pt"})
        fsync(directory / name)  # on disk before the directory is renamed into place
        files.append(name)
        shards[-1], sizes[-1] = {}, 0

    weight_map: dict[str, int] = {}
    total = 0
    for name, tensor in tensors:
        if name in weight_map:
            raise ValueError(f"tensor {name!r} was given twice")
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > shard_bytes:
            flush()
        shards[-1][name] = tensor.detach().to("cpu", copy=True).contiguous()
        sizes[-1] += nbytes
        weight_map[name] = len(files)
        total += nbytes
    if not weight_map:
        raise ValueError("no tensors to write")
    flush()
    count = len(files)
    final = {}
    for i, old in enumerate(files):  # model-00001-of-0000N.safetensors, as HF names them
        new = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(directory / old, directory / new)
        final[i] = new
    index = {
        "metadata": {"total_size": total},
        "weight_map": {n: final[i] for n, i in sorted(weight_map.items())},
    }
    (directory / INDEX).write_text(json.dumps(index, indent=2))


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out is moved aside first and removed afterwards."""
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, aside / out.name)
    os.replace(staging, out)
    shutil.rmtree(aside)
