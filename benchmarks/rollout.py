"""Rollout engines side by side in one run, on the same Llama-style model, all with the machine's
cores (2 threads on CI machines):

(a) generated tokens/s: the embedded engine (fp32), vLLM colocated in fp32 and bf16, and a
    `vllm serve` in fp32 (prompts x n samples, every response to max_tokens)
(b) weight sync (export stream -> engine) GB/s for each placement: embedded, colocated vLLM
    (mrpg_local, in-process), vllm serve (mrpg_gloo, another process), vs
(c) a plain copy of the same bytes (a clone of every parameter)

  python benchmarks/rollout.py [--hidden 512 --layers 8 --vocab 32000 --prompts 64 --n 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

THREADS = os.cpu_count() or 1


def _generate(engine: Any, prompts: list[list[int]], params: Any) -> tuple[int, float]:
    start = time.perf_counter()
    groups = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return sum(len(r.token_ids) for g in groups for r in g), seconds


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)  # every engine gets the machine's cores
    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel
    from megatron_rpg.rollout import EmbeddedEngine, SamplingParams, sync_weights
    from megatron_rpg.rollout.vllm_engine import VLLMEngine, VLLMServerEngine
    from megatron_rpg.rollout.vllm_server import (
        server_command,
        server_environment,
        wait_until_healthy,
    )

    hf = dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )
    initialize_model_parallel(ParallelConfig(), seed=0)
    arch = ModelArch.from_hf(hf)
    chunks = build_model_chunks(arch, ParallelConfig(), torch.float32)
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(hf))
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(args.vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(args.prompts)
    ]
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, seed=0)
    out: dict[str, Any] = {}

    start = time.perf_counter()
    copies = [p.detach().clone() for p in chunks[0].parameters()]
    out["copy"] = (sum(c.numel() * c.element_size() for c in copies), time.perf_counter() - start)

    def run(name: str, engine: Any) -> None:
        sync_weights(chunks, arch, engine)  # warm-up (and the first weights)
        stats = sync_weights(chunks, arch, engine)
        tokens, seconds = _generate(engine, prompts, params)
        out[name] = {
            "sync_bytes": stats.bytes,
            "sync_s": stats.seconds,
            "tokens": tokens,
            "gen_s": seconds,
        }
        engine.close()

    run("embedded fp32", EmbeddedEngine(hf))
    for dtype in ("float32", "bfloat16"):
        run(
            f"vLLM colocated {dtype}",
            VLLMEngine(model_dir, dtype=dtype, kv_cache_gb=2, max_model_len=1024),
        )
    port = 8000 + os.getpid() % 1000
    process = subprocess.Popen(
        server_command(model_dir, port, dtype="float32", host="127.0.0.1", max_model_len=1024),
        env=server_environment(kv_cache_gb=2, threads=THREADS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, 600, process)
        run("vllm serve fp32", VLLMServerEngine(url, hf, "mrpg_gloo"))
    finally:
        os.killpg(process.pid, 9)
        process.wait()
    return out


def main() -> None:
    from megatron_rpg.parallel import RankPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with RankPool(1, timeout_s=3600) as pool:
        (r,) = pool.run(measure, args)
    copied, copy_s = r.pop("copy")
    copy_gbs = copied / 1e9 / copy_s
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"{copied / 1e9:.3f} GB fp32; {args.prompts} prompts x n={args.n}, "
        f"{args.max_tokens} new tokens; {THREADS} threads"
    )
    embedded = r["embedded fp32"]["tokens"] / r["embedded fp32"]["gen_s"]
    print(f"{'engine':<24} {'tok/s':>8} {'x embedded':>11} {'sync GB/s':>10} {'x copy':>7}")
    for name, m in r.items():
        rate = m["tokens"] / m["gen_s"]
        sync_gbs = m["sync_bytes"] / 1e9 / m["sync_s"]
        print(
            f"{name:<24} {rate:8.0f} {rate / embedded:11.2f} {sync_gbs:10.2f} "
            f"{sync_gbs / copy_gbs:7.2f}"
        )
    print(f"{'plain copy':<24} {'':>8} {'':>11} {copy_gbs:10.2f} {1:7.2f}")


if __name__ == "__main__":
    main()
