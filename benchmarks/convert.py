"""Conversion throughput, side by side in one run, on a synthetic Llama-style HF checkpoint:

(a) safetensors alone: read every tensor of the HF directory and write it to another directory,
    then fsync the files, as every checkpoint writer here does before renaming (a durable write;
    printed also without the fsync)
(b) hf-to-mcore at TP=1 (on one spawned rank): stream HF tensors into the model, save a Megatron
    distributed checkpoint; measured inside the rank, without process start-up
(c) the export stream (iter_hf_weights) over the loaded model vs (d) a plain copy of the same
    bytes (torch.Tensor.clone of every parameter)

  python benchmarks/convert.py [--hidden 1024 --layers 8 --vocab 32000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def hf_config(args: argparse.Namespace) -> dict:
    return dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )


def synthetic_checkpoint(args: argparse.Namespace, out: Path) -> int:
    from megatron_rpg.checkpoint import write_hf_checkpoint
    from megatron_rpg.models import ModelArch
    from megatron_rpg.models.hf_mapping import hf_sources, megatron_names

    arch = ModelArch.from_hf(hf_config(args))
    h, f, v, d = args.hidden, arch.ffn_hidden_size, args.vocab, arch.head_dim
    shapes = {
        "self_attn.q_proj.weight": (arch.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.v_proj.weight": (arch.num_query_groups * d, h),
        "self_attn.o_proj.weight": (h, arch.num_attention_heads * d),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }

    def shape(name: str) -> tuple[int, ...]:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (v, h)
        for suffix, s in shapes.items():
            if name.endswith(suffix):
                return s
        return (h,)  # norms

    names = [s for n in megatron_names(arch) for s in hf_sources(n)]
    tensors = [(n, torch.randn(shape(n)) * 0.02) for n in names]
    write_hf_checkpoint(out, tensors, hf_config(args), shard_bytes=512 * 2**20)
    return sum(t.numel() * t.element_size() for _, t in tensors)


def safetensors_alone(src: Path, dst: Path) -> tuple[float, float]:
    """Seconds to read + write, and to read + write + fsync."""
    from safetensors.torch import save_file

    from megatron_rpg.checkpoint import HFCheckpoint
    from megatron_rpg.checkpoint.hf import fsync

    start = time.perf_counter()
    source = HFCheckpoint(src)
    dst.mkdir()
    batch, size, part = {}, 0, 0
    for name in source.names():
        tensor = source.get(name)
        batch[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size > 512 * 2**20:
            save_file(batch, dst / f"part{part}.safetensors")
            batch, size, part = {}, 0, part + 1
    if batch:
        save_file(batch, dst / f"part{part}.safetensors")
    written = time.perf_counter() - start
    for path in dst.iterdir():
        fsync(path)
    return written, time.perf_counter() - start


def timed_conversion(src: str, out: str) -> dict:
    import megatron.core.dist_checkpointing
    import megatron.core.models.gpt  # noqa: F401

    from megatron_rpg.checkpoint import HFCheckpoint
    from megatron_rpg.checkpoint.convert import hf_to_mcore
    from megatron_rpg.models import ModelArch
    from megatron_rpg.models.export import iter_hf_weights
    from megatron_rpg.parallel import destroy_model_parallel

    start = time.perf_counter()
    hf_to_mcore(src, out, 1, 1)
    convert_s = time.perf_counter() - start
    destroy_model_parallel()
    # the export stream over a loaded model, vs a plain copy of its parameters
    from megatron_rpg.checkpoint.mcore import load_mcore
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel

    arch = ModelArch.from_hf(HFCheckpoint(src).config)
    initialize_model_parallel(ParallelConfig(), seed=0)
    chunks = build_model_chunks(arch, ParallelConfig(), torch.float32, initialize=False)
    load_mcore(chunks, out)
    start = time.perf_counter()
    streamed = sum(t.numel() * t.element_size() for _, t in iter_hf_weights(chunks, arch))
    stream_s = time.perf_counter() - start
    start = time.perf_counter()
    copies = [p.detach().clone() for p in chunks[0].parameters()]
    copy_s = time.perf_counter() - start
    copied = sum(c.numel() * c.element_size() for c in copies)
    return {
        "convert_s": convert_s,
        "stream_s": stream_s,
        "copy_s": copy_s,
        "streamed": streamed,
        "copied": copied,
    }


def main() -> None:
    from megatron_rpg.parallel import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        nbytes = synthetic_checkpoint(args, work / "hf")
        gb = nbytes / 1e9
        plain_s, base_s = safetensors_alone(work / "hf", work / "copy")
        (r,) = run_on_ranks(1, timed_conversion, str(work / "hf"), str(work / "mcore"))
        print(
            f"checkpoint: {gb:.2f} GB fp32 (hidden {args.hidden}, {args.layers} layers, "
            f"vocab {args.vocab})"
        )
        print(
            f"(a) safetensors read+write+fsync: {base_s:6.2f} s  {gb / base_s:6.2f} GB/s  "
            f"(without fsync {plain_s:.2f} s)"
        )
        print(
            f"(b) hf-to-mcore TP1:              {r['convert_s']:6.2f} s  "
            f"{gb / r['convert_s']:6.2f} GB/s  ratio to (a): {base_s / r['convert_s']:.2f} "
            f"(target >= 0.5; {plain_s / r['convert_s']:.2f} without fsync)"
        )
        print(
            f"(c) export stream:                {r['stream_s']:6.2f} s  "
            f"{r['streamed'] / 1e9 / r['stream_s']:6.2f} GB/s"
        )
        print(
            f"(d) plain copy:                   {r['copy_s']:6.2f} s  "
            f"{r['copied'] / 1e9 / r['copy_s']:6.2f} GB/s  (c)/(d): "
            f"{(r['streamed'] / r['stream_s']) / (r['copied'] / r['copy_s']):.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
