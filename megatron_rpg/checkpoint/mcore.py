"""Megatron distributed checkpoints of the policy's model chunks, readable at any TP x PP.

    save_mcore(chunks, "ckpt", hf_config)     # collective over all ranks; atomic
    load_mcore(chunks, "ckpt")                # any layout: dist_checkpointing reshards
    hf_config = checkpoint_hf_config("ckpt")  # the architecture travels with the checkpoint

A training checkpoint (run/checkpoints/step_N, trainer.py) holds the policy the same way in its
dist/ directory, with the HF config and tokenizer files; every function here takes either.

The checkpoint is written into a temporary directory beside `out` and renamed by rank 0 after
every rank finished (barriers around it); an existing `out` is refused unless force=True.
VPP chunks are saved as model0, model1, ...
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpg.checkpoint.hf import TOKENIZER_FILES
from megatron_rpg.models.arch import read_hf_config

HF_CONFIG = "hf_config.json"


def _key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"


@contextlib.contextmanager
def in_process_write_results() -> Iterator[None]:
    """dist_checkpointing's writer reports results through a queue that, by default, lives in a
    multiprocessing Manager: a spawned process (~3 s to start on 2 CPU cores) that only an
    asynchronous save needs. Our saves are synchronous, run the writer from this process and read
    the results here, so a plain queue does the same job."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def save_mcore(
    model_chunks: list[Any],
    out: str | Path,
    hf_config: dict[str, Any],
    force: bool = False,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Save collectively; HF config and tokenizer files travel inside the checkpoint."""
    from megatron.core import dist_checkpointing

    out = Path(out)
    staging = out.parent / f".{out.name}.tmp"
    refused = out.exists() and not force
    if dist.get_rank() == 0 and not refused:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    if refused:
        raise FileExistsError(f"{out} exists; pass force=True (--force) to replace it")
    state = {
        _key(i, len(model_chunks)): chunk.sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }
    try:
        with in_process_write_results():
            dist_checkpointing.save(state, str(staging))
    except BaseException:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dist.barrier()
    if dist.get_rank() == 0:
        for name, content in model_files(hf_config, tokenizer_from).items():
            (staging / name).write_bytes(content)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    dist.barrier()
    return out


def model_files(hf_config: dict[str, Any], tokenizer: str | Path | None) -> dict[str, bytes]:
    """What makes saved weights a model, by file name: the HF config, and the tokenizer files
    of `tokenizer` (a directory, or a sentencepiece model file)."""
    files = {HF_CONFIG: json.dumps(hf_config, indent=2, sort_keys=True).encode()}
    path = Path(tokenizer) if tokenizer is not None else None
    if path is not None and path.is_file():
        files["tokenizer.model"] = path.read_bytes()
    elif path is not None:
        files.update({n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()})
    return files


def model_checkpoint(checkpoint: str | Path) -> Path:
    """The directory holding the weights, HF config and tokenizer: `checkpoint` itself, or the
    dist/ of a training checkpoint."""
    checkpoint = Path(checkpoint)
    for directory in (checkpoint, checkpoint / "dist"):
        if (directory / HF_CONFIG).is_file():
            return directory
    raise FileNotFoundError(f"{checkpoint}: not a megatron_rpg checkpoint (no {HF_CONFIG})")


def load_mcore(model_chunks: list[Any], checkpoint: str | Path) -> None:
    """The policy's weights (a training checkpoint's other state, optimizer and reference, is
    left unread)."""

    checkpoint = model_checkpoint(checkpoint)
    state = {
        _key(i, len(model_chunks)): chunk.sharded_state_dict()
        for i, chunk in enumerate(model_chunks)
    }
    loaded = load_across_layer_specs(state, checkpoint)
    for i, chunk in enumerate(model_chunks):
        load_module_state(chunk, loaded[_key(i, len(model_chunks))])


def load_across_layer_specs(state: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """dist_checkpointing.load of `state`, where the checkpoint may come from the other layer
    spec: both save the same weight keys, but only TE's attention has an `_extra_state` (empty
    without FP8). Such entries absent from the checkpoint are left out of the load; any other
    absent entry is refused, named."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    # "unexpected" in dist_checkpointing's words: asked for, but not in the checkpoint
    loaded, _, absent = dist_checkpointing.load(
        state, str(directory), strict=StrictHandling.RETURN_UNEXPECTED
    )
    refused = sorted(key for key in absent if not key.endswith("_extra_state"))
    if refused:
        raise KeyError(f"{directory}: the checkpoint has no {', '.join(refused[:4])}")
    return loaded


def load_module_state(module: Any, state: dict[str, Any]) -> None:
    """module.load_state_dict, where only `_extra_state` entries may be absent (see
    load_across_layer_specs)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    refused = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if refused:
        raise KeyError(f"the checkpoint's state does not fit the model: {refused[:4]}")


def checkpoint_hf_config(checkpoint: str | Path) -> dict[str, Any]:
    """The Hugging Face config that travels with a Megatron checkpoint."""
    return read_hf_config(model_checkpoint(checkpoint) / HF_CONFIG)
