"""Checkpoint conversion, run on every rank of a TP x PP world (tools/convert_checkpoint.py starts
the ranks: gloo processes on the CPU, or torchrun on GPUs).

    hf_to_mcore:  HF directory -> Megatron distributed checkpoint, streaming one HF tensor at a time
    mcore_to_hf:  Megatron checkpoint -> HF directory, through the export stream (rank 0 writes)
    reshard:      Megatron checkpoint -> Megatron checkpoint at another TP x PP

Outputs are written atomically and never replace an existing directory without force.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from megatron_rpg.checkpoint.hf import HFCheckpoint, write_hf_checkpoint
from megatron_rpg.checkpoint.mcore import (
    checkpoint_hf_config,
    load_mcore,
    model_checkpoint,
    save_mcore,
)
from megatron_rpg.config import ParallelConfig
from megatron_rpg.models import ModelArch, build_model_chunks, load_full_state_dict
from megatron_rpg.models.export import iter_hf_weights
from megatron_rpg.models.hf_mapping import hf_names, hf_sources, to_megatron
from megatron_rpg.models.sharding import sharded_parameters
from megatron_rpg.parallel import initialize_model_parallel
from megatron_rpg.run.progress import Progress

T = TypeVar("T")
VERIFY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1}  # max |logit difference|


def verify_prompt(vocab_size: int) -> torch.Tensor:
    """The fixed [2, 24] prompt that conversions are verified on."""
    return torch.arange(48).remainder(vocab_size).reshape(2, 24)


def check_difference(difference: float, dtype: torch.dtype, what: str) -> float:
    """`difference` (max |logits difference|) if within the dtype's tolerance, else ValueError."""
    tolerance = VERIFY_TOLERANCE.get(dtype, 0.1)
    if not difference <= tolerance:
        raise ValueError(
            f"verify: logits differ {what} by {difference:.3g} (tolerance {tolerance})"
        )
    return difference


def verify_logits(chunks: list[Any], arch: ModelArch, hf_dir: str | Path) -> float | None:
    """Compare our model's logits with the transformers model in `hf_dir` on a fixed prompt.
    Collective. Our logits are computed first; then `chunks` is emptied (the caller's model is
    released) before the world's last rank alone loads the transformers model and compares,
    so that no host holds two full models (at 70B, 141 GB each in bf16). Raises there if they
    differ beyond the tolerance; returns the max |difference| there (None elsewhere). Needs
    transformers."""
    from megatron_rpg.forward_backward import full_logits

    prompt = verify_prompt(arch.vocab_size)
    ours = full_logits(chunks, prompt, arch.vocab_size)
    dtype = chunks[0].config.params_dtype
    chunks.clear()
    gc.collect()
    if dist.get_rank() != dist.get_world_size() - 1:
        return None
    assert ours is not None  # the last rank is on the last pipeline stage
    try:
        import transformers
    except ImportError:
        raise RuntimeError("--verify needs transformers (pip install transformers)") from None
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = reference(prompt).logits
    difference = (ours.float() - theirs).abs().max().item()
    return check_difference(difference, dtype, f"from the transformers model in {hf_dir}")


def _report(difference: float | None) -> None:
    if difference is not None:
        print(f"verify: max |logits difference| vs transformers = {difference:.3g}", flush=True)


def _refuse_existing(out: str, force: bool) -> None:
    """Checked on every rank before any collective, so that no rank waits for a refusing one."""
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")


def _build(
    hf_config: dict[str, Any], tp: int, pp: int, layer_spec: str
) -> tuple[ModelArch, list[Any]]:
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    arch = ModelArch.from_hf(hf_config)
    initialize_model_parallel(parallel, seed=0)
    chunks = build_model_chunks(arch, parallel, torch.float32, False, layer_spec)
    return arch, chunks


def _counted(stream: Iterable[T], total: int) -> Iterator[T]:
    progress = Progress(total, "tensors written")
    for item in stream:
        yield item
        progress.update(1)
    progress.close()


def hf_to_mcore(
    hf_dir: str,
    out: str,
    tp: int,
    pp: int,
    force: bool = False,
    verify: bool = False,
    layer_spec: str = "auto",
) -> None:
    _refuse_existing(out, force)
    source = HFCheckpoint(hf_dir)
    arch, chunks = _build(source.config, tp, pp, layer_spec)
    count = sum(len(list(sharded_parameters(chunk))) for chunk in chunks)
    progress = Progress(count, "parameters loaded (rank 0)", enabled=dist.get_rank() == 0)

    loading: list[str] = []

    def load(name: str) -> torch.Tensor:
        progress.update(1)
        loading[:] = hf_sources(name)
        return to_megatron(name, source.get, arch)

    try:
        for chunk in chunks:
            load_full_state_dict(chunk, load)
    except ValueError as err:
        raise ValueError(f"{err} (read from {', '.join(loading)} in {hf_dir})") from None
    progress.close()
    save_mcore(chunks, out, source.config, force=force, tokenizer_from=hf_dir)
    if verify:
        _report(verify_logits(chunks, arch, hf_dir))


def mcore_to_hf(
    checkpoint: str,
    out: str,
    tp: int = 1,
    pp: int = 1,
    force: bool = False,
    verify: bool = False,
    layer_spec: str = "auto",
) -> None:
    _refuse_existing(out, force)
    hf_config = checkpoint_hf_config(checkpoint)
    arch, chunks = _build(hf_config, tp, pp, layer_spec)
    load_mcore(chunks, checkpoint)
    stream = iter_hf_weights(chunks, arch)
    if dist.get_rank() == 0:
        write_hf_checkpoint(
            out,
            _counted(stream, len(hf_names(arch))),
            hf_config,
            tokenizer_from=model_checkpoint(checkpoint),
            force=force,
        )
    else:
        for _ in stream:  # take part in the collectives; rank 0 writes
            pass
    if verify:
        dist.barrier()  # the HF directory is complete
        _report(verify_logits(chunks, arch, out))


def reshard(
    checkpoint: str,
    out: str,
    tp: int,
    pp: int,
    force: bool = False,
    verify: bool = False,
    layer_spec: str = "auto",
) -> None:
    """(verify applies to conversions from or to HF; a reshard has no HF side to compare.)"""
    _refuse_existing(out, force)
    hf_config = checkpoint_hf_config(checkpoint)
    _, chunks = _build(hf_config, tp, pp, layer_spec)
    load_mcore(chunks, checkpoint)
    save_mcore(chunks, out, hf_config, force=force, tokenizer_from=model_checkpoint(checkpoint))
