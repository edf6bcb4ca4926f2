"""Training checkpoints: everything needed to continue a run bit-identically.

    run_dir/checkpoints/step_00000010/
        dist/            policy model + optimizer (+ reference model), Megatron dist checkpoint
        rng/rank_R.pt    each rank's torch and python RNG states
        state.json       step, data position, counters, LR scheduler
        config.yaml      the resolved run config
        manifest.json    versions, git revision, sha256 of every file above
        COMPLETE         written last

A checkpoint is assembled in a hidden temporary directory and renamed when every rank has
finished; only the newest `keep_last` are kept. `latest_valid()` walks the checkpoints newest
first and skips (with a warning) one without COMPLETE or whose files do not match their sha256;
when every one fails, it raises rather than start over. Hashing is shared: at a save and at a
resume, rank r of W hashes (and fsyncs) the files r, r + W, r + 2W, ... of the checkpoint in
sorted order, so a 70B checkpoint's ~1 TB is read once, by every rank in parallel, not by rank 0
alone while the others wait.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_rpg.checkpoint.hf import fsync
from megatron_rpg.checkpoint.mcore import (
    in_process_write_results,
    load_across_layer_specs,
    load_module_state,
)
from megatron_rpg.run.manifest import git_revision, sha256, versions
from megatron_rpg.run.run_dir import MARKER, checkpoint_dir, complete_checkpoints

FULL_BELOW_BYTES = 2**20  # a failed write with less free space than this: the disk is full


def rng_state() -> dict[str, Any]:
    """This process's torch and python RNG states, as tensors, ints and a float (what
    torch.load(weights_only=True) reads back)."""
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, *internal], "python_gauss": gauss}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    flat = state["python"]
    random.setstate((flat[0], tuple(flat[1:]), state["python_gauss"]))


def _chunk_key(name: str, index: int, count: int) -> str:
    """ "model" / "reference" for one model chunk; "model0", "model1", ... for virtual stages."""
    return name if count == 1 else f"{name}{index}"


def sharded_state(
    policy_chunks: list[Any],
    optimizer: Any,
    reference_chunks: list[Any] | None,
    is_loading: bool,
) -> dict[str, Any]:
    """The Megatron sharded state of the policy's chunks (unwrapped), the optimizer and the
    reference model's chunks (their keys prefixed "reference.")."""
    count = len(policy_chunks)
    state: dict[str, Any] = {}
    model_state: dict[str, Any] = {}
    for i, chunk in enumerate(policy_chunks):
        key = _chunk_key("model", i, count)
        state[key] = model_state[key] = chunk.sharded_state_dict()
    for i, chunk in enumerate(reference_chunks or []):
        state[_chunk_key("reference", i, count)] = chunk.sharded_state_dict(prefix="reference.")
    merged = {k: v for chunk_state in model_state.values() for k, v in chunk_state.items()}
    state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading)
    return state


def load_sharded_state(
    loaded: dict[str, Any],
    policy_chunks: list[Any],
    optimizer: Any,
    reference_chunks: list[Any] | None,
) -> None:
    """Put what load_train_checkpoint returned for sharded_state(...) back into the parts."""
    count = len(policy_chunks)
    for i, chunk in enumerate(policy_chunks):
        load_module_state(chunk, loaded[_chunk_key("model", i, count)])
    for i, chunk in enumerate(reference_chunks or []):
        state = loaded[_chunk_key("reference", i, count)]
        load_module_state(chunk, {k.removeprefix("reference."): v for k, v in state.items()})
    optimizer.load_state_dict(loaded["optimizer"])


def _my_share(items: list[Any]) -> list[Any]:
    """This rank's share of a list every rank holds in the same order: items rank, rank + W..."""
    return items[dist.get_rank() :: dist.get_world_size()]


def _gathered(local: Any) -> list[Any]:
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return everyone


def _hash_and_sync(directory: Path, checksums: bool) -> dict[str, str]:
    """Collective: the sha256 of every file under `directory` (each rank its share, fsynced)."""
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    digests = {}
    for name in _my_share(files):
        fsync(directory / name)
        if checksums:
            digests[name] = sha256(directory / name)
    return {name: digest for part in _gathered(digests) for name, digest in part.items()}


def save_train_checkpoint(
    run_dir: str | Path,
    step: int,
    state_dicts: dict[str, Any],
    train_state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    checksums: bool = True,
    model_files: dict[str, bytes] | None = None,
) -> Path:
    """Collective. `state_dicts` from sharded_state(..., is_loading=False). `model_files` (the
    HF config and tokenizer files) are written beside the weights in dist/, which makes dist/ a
    model checkpoint that `megatron-rpg eval --ckpt` and `convert mcore-to-hf` read."""
    out = checkpoint_dir(run_dir, step)
    staging = out.parent / f".{out.name}.tmp"
    try:
        _write_staging(staging, step, state_dicts, train_state, config_yaml, checksums, model_files)
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException
        free = shutil.disk_usage(out.parent).free if out.parent.is_dir() else 0
        shutil.rmtree(staging, ignore_errors=True)
        # a full disk reaches us as OSError, or as a torch writer's "unexpected pos" in DCP's
        detail = str(err).strip().splitlines()[-1].strip() if str(err).strip() else repr(err)
        full = free < FULL_BELOW_BYTES or f"[Errno {errno.ENOSPC}]" in str(err)
        cause = f"{os.strerror(errno.ENOSPC)} ({free / 2**20:.1f} MiB free; {detail})"
        raise CheckpointWriteError(
            f"checkpoint {out} not written: {cause if full else detail}; the partial copy is "
            f"removed, the earlier checkpoints are intact"
        ) from err
    if dist.get_rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        _prune(out.parent, keep_last)
    dist.barrier()
    return out


class CheckpointWriteError(OSError):
    """A training checkpoint could not be written (full disk, I/O error); names the path."""


def _write_staging(
    staging: Path,
    step: int,
    state_dicts: dict[str, Any],
    train_state: dict[str, Any],
    config_yaml: str,
    checksums: bool,
    model_files: dict[str, bytes] | None,
) -> None:
    """Collective: every file of the checkpoint into `staging`, fsynced, COMPLETE last."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "rng").mkdir(parents=True)
        (staging / "dist").mkdir()
    dist.barrier()
    with in_process_write_results():
        dist_checkpointing.save(state_dicts, str(staging / "dist"))
    torch.save(rng_state(), staging / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        (staging / "state.json").write_text(json.dumps(train_state, indent=2, sort_keys=True))
        (staging / "config.yaml").write_text(config_yaml)
        for name, content in (model_files or {}).items():
            (staging / "dist" / name).write_bytes(content)
    dist.barrier()
    digests = _hash_and_sync(staging, checksums)
    if rank == 0:
        manifest = {"versions": versions(), "git_revision": git_revision(), "sha256": digests}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        fsync(staging / "manifest.json")
        (staging / MARKER).write_text(str(step))
    dist.barrier()


def _prune(directory: Path, keep_last: int) -> None:
    for old in complete_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why this checkpoint cannot be used, or None; share (r, W): hash only the manifest's files
    r, r + W, ... (one rank's part of a parallel check)."""
    if not (directory / MARKER).is_file():
        return "incomplete (no COMPLETE marker)"
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        return f"unreadable manifest.json ({err})"
    index, count = share
    for name, digest in sorted(manifest.get("sha256", {}).items())[index::count]:
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if sha256(path) != digest:
            return f"file {name} does not match its sha256 (corrupt)"
    return None


def latest_valid(run_dir: str | Path) -> Path | None:
    """The newest usable checkpoint, None when there is none at all. Collective: rank 0 lists
    the candidates, every rank verifies its share of each one's files. Checkpoints that all fail
    verify() raise: starting over on them is the user's call, not resume's."""
    root = Path(run_dir) / "checkpoints"
    listed: list[Any] = [sorted(map(str, root.glob("step_*")), reverse=True)]
    dist.broadcast_object_list(listed, src=0)  # the same candidates, in order, on every rank
    directory, problems = None, []
    share = (dist.get_rank(), dist.get_world_size())
    for candidate in map(Path, listed[0]):
        found = [p for p in _gathered(verify(candidate, share)) if p is not None]
        if not found:
            directory = str(candidate)
            break
        if dist.get_rank() == 0:
            warnings.warn(f"skipping checkpoint {candidate}: {found[0]}", stacklevel=2)
        problems.append(f"{candidate.name}: {found[0]}")
    if directory is None and problems:
        raise RuntimeError(
            f"resume: no usable checkpoint in {Path(run_dir) / 'checkpoints'} ("
            + "; ".join(problems)
            + "); move them away to start over"
        )
    return Path(directory) if directory else None


def load_train_checkpoint(directory: Path, state_dicts: dict[str, Any]) -> tuple[dict, dict]:
    """Collective: (loaded sharded state, train state); restores this rank's RNG states."""
    loaded = load_across_layer_specs(state_dicts, directory / "dist")
    set_rng_state(torch.load(directory / "rng" / f"rank_{dist.get_rank()}.pt", weights_only=True))
    return loaded, json.loads((directory / "state.json").read_text())


class Stateful(Protocol):
    """A checkpoint component whose state is small and the same on every rank (counters, an LR
    schedule, a moving average): saved as JSON under its name in state.json."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """A run's training checkpoints (as torchtitan's CheckpointManager): the sharded state of the
    policy's chunks (unwrapped), the optimizer and the reference model's chunks, with the state of
    every Stateful component by name. Collective."""

    def __init__(
        self,
        run_dir: Path,
        policy_chunks: list[Any],
        optimizer: Any,
        reference_chunks: list[Any] | None,
        components: dict[str, Stateful],
        settings: Any,  # the config's CheckpointConfig
        config_yaml: str,
        model_files: dict[str, bytes],
    ):
        self.run_dir, self.policy, self.optimizer = run_dir, policy_chunks, optimizer
        self.reference, self.components, self.settings = reference_chunks, components, settings
        self.config_yaml, self.model_files = config_yaml, model_files

    def _state(self, is_loading: bool) -> dict[str, Any]:
        return sharded_state(self.policy, self.optimizer, self.reference, is_loading)

    def save(self, step: int) -> Path:
        return save_train_checkpoint(
            self.run_dir,
            step,
            self._state(False),
            {name: part.state_dict() for name, part in self.components.items()},
            self.config_yaml,
            self.settings.keep_last,
            self.settings.verify_checksums,
            self.model_files,
        )

    def resume(self) -> Path | None:
        """Load the newest usable checkpoint into the parts and the components (rank 0 says which);
        its directory, or None when the run has none."""
        directory = latest_valid(self.run_dir)
        if dist.get_rank() == 0:
            fresh = f"no usable checkpoint in {self.run_dir}; starting fresh"
            step = (directory / MARKER).read_text() if directory else ""
            found = f"continuing from {directory} (step {step})"
            print(f"resume: {found if directory else fresh}", flush=True)
        if directory is None:
            return None
        loaded, state = load_train_checkpoint(directory, self._state(True))
        load_sharded_state(loaded, self.policy, self.optimizer, self.reference)
        for name, part in self.components.items():
            part.load_state_dict(state[name])
        return directory
