"""Rollout throughput and weight sync, side by side in one run, on a Llama-style model at TP=1:

(a) the embedded engine's generated tokens/s (batch of prompts x n samples, KV cache)
(b) weight sync (export stream -> engine.update_weights) seconds and GB/s, vs
(c) a plain tensor copy of the same bytes (clone of every parameter)

  python benchmarks/rollout.py [--hidden 512 --layers 8 --vocab 32000 --prompts 16 --n 4]
"""

from __future__ import annotations

import argparse
import time


def measure(args: argparse.Namespace) -> dict:
    import torch

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel
    from megatron_rpg.rollout import EmbeddedEngine, SamplingParams, sync_weights

    hf = dict(
        model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5,
        max_position_embeddings=1024, tie_word_embeddings=False, hidden_act="silu",
    )  # fmt: skip
    initialize_model_parallel(ParallelConfig(), seed=0)
    arch = ModelArch.from_hf(hf)
    chunks = build_model_chunks(arch, ParallelConfig(), torch.float32)
    engine = EmbeddedEngine(hf)
    sync_weights(chunks, arch, engine)  # warm-up
    stats = sync_weights(chunks, arch, engine)
    start = time.perf_counter()
    copies = [p.detach().clone() for p in chunks[0].parameters()]
    copy_s = time.perf_counter() - start
    copied = sum(c.numel() * c.element_size() for c in copies)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(args.vocab, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.prompts)]  # fmt: skip
    params = SamplingParams(n=args.n, max_tokens=args.max_tokens, seed=0)
    start = time.perf_counter()
    groups = engine.generate(prompts, params)
    gen_s = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for g in groups for r in g)
    return {"sync": stats, "copy_s": copy_s, "copied": copied, "gen_s": gen_s, "tokens": tokens}


def main() -> None:
    from megatron_rpg.parallel import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    (r,) = run_on_ranks(1, measure, args)
    sync, gb = r["sync"], r["sync"].bytes / 1e9
    copy_gbs = r["copied"] / 1e9 / r["copy_s"]
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{gb:.3f} GB fp32")  # fmt: skip
    print(
        f"(a) embedded generate: {r['tokens']} tokens ({args.prompts} prompts x n={args.n}, "
        f"{args.max_tokens} new) in {r['gen_s']:.2f} s = {r['tokens'] / r['gen_s']:.0f} tok/s"
    )
    print(f"(b) weight sync:       {sync.seconds:.3f} s  {sync.gb_per_s:.2f} GB/s")
    print(f"(c) plain copy:        {r['copy_s']:.3f} s  {copy_gbs:.2f} GB/s  "
          f"(b)/(c): {sync.gb_per_s / copy_gbs:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
