"""The pipeline's idle fraction (perf/pipeline_bubble) at PP2 and PP4 on gloo ranks, side by side:

  (a) per shape:  one Megatron schedule per distinct micro-batch shape (the code before issue 32:
                  length-bucketed micro-batches, each shape's schedule filling and draining alone)
  (b) one schedule: every micro-batch in one schedule (shapes exchanged per transfer), at least
                  2 x PP micro-batches (forward_backward.py; step/batch.py: length_bucketed)

Same model, same rows: a mini-batch of 32 sequences with lengths drawn like a rollout's (prompt
32-64 + response 16-128 tokens), cut by length_bucketed (micro-batch size 8; (b) with fewest=2P).
The bubble is 1 - (the rank's forward + backward compute) / schedule time, from Megatron's timers,
averaged over the ranks; time is the training forward-backward's wall time, best of --repeats.

    python benchmarks/pipeline_bubble.py            # PP2 and PP4 (4 ranks on the CPU cores)
"""

from __future__ import annotations

import argparse
import time

import torch

HF = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    hidden_act="silu",
)


def rows(count: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(32, 65, (count,), generator=g) + torch.randint(
        16, 129, (count,), generator=g
    )
    tokens = torch.randint(HF["vocab_size"], (count, int(lengths.max())), generator=g)
    return tokens, lengths


def measure(pp: int, repeats: int) -> dict[str, tuple[float, float, int, int]]:
    """On each rank: {way: (bubble, seconds, schedules, micro-batches)} for the training pass."""
    import torch.distributed as dist

    from megatron_rpg.config import ParallelConfig
    from megatron_rpg.forward_backward import LogprobOptions, ScheduleTimes, forward_backward
    from megatron_rpg.models import ModelArch, build_model_chunks
    from megatron_rpg.parallel import initialize_model_parallel
    from megatron_rpg.step.batch import length_bucketed

    parallel = ParallelConfig(pipeline_parallel=pp)
    layout = initialize_model_parallel(parallel, seed=0)
    arch = ModelArch.from_hf(HF)
    chunks = build_model_chunks(arch, parallel, torch.float32)
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    ddp = [DistributedDataParallel(config, DistributedDataParallelConfig(), c) for c in chunks]
    tokens, lengths = rows()
    options = LogprobOptions(arch.vocab_size)

    def loss_fn(lp, entropy, batch):
        return lp.sum() * 1e-3, {}

    def micro(index):
        width = int(lengths[index].max())
        return {"tokens": tokens[index, :width]}

    ways = {
        "per shape": [micro(i) for i in length_bucketed(lengths, 8)],
        "one schedule": [micro(i) for i in length_bucketed(lengths, 8, fewest=2 * pp)],
    }
    out = {}
    for name, micros in ways.items():
        shapes = {tuple(m["tokens"].shape) for m in micros}
        best, bubble = float("inf"), 0.0
        for _ in range(repeats):
            times = ScheduleTimes()
            dist.barrier()
            start = time.perf_counter()
            if name == "per shape":
                for shape in shapes:
                    same = [m for m in micros if tuple(m["tokens"].shape) == shape]
                    forward_backward(ddp, same, options, loss_fn, times=times)
            else:
                forward_backward(ddp, micros, options, loss_fn, times=times)
            seconds = time.perf_counter() - start
            if seconds < best:
                best, bubble = seconds, times.bubble
        out[name] = (bubble, best, len(shapes) if name == "per shape" else 1, len(micros))
    del layout
    return out


def main() -> None:
    from megatron_rpg.parallel import RankPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"model: {HF['num_hidden_layers']} layers, hidden {HF['hidden_size']}; "
        "32 rows, micro-batch 8"
    )
    print(
        f"{'PP':>3} {'way':>13} {'schedules':>9} {'micro-b.':>8} {'bubble':>7} "
        f"{'time s':>7} {'speed':>6}"
    )
    for pp in (2, 4):
        with RankPool(world_size=pp) as pool:
            results = pool.run(measure, pp, args.repeats)
        base_time = max(r["per shape"][1] for r in results)
        for way in ("per shape", "one schedule"):
            bubble = sum(r[way][0] for r in results) / len(results)
            seconds = max(r[way][1] for r in results)
            schedules, count = results[0][way][2], results[0][way][3]
            print(
                f"{pp:>3} {way:>13} {schedules:>9} {count:>8} {bubble:>7.2f} {seconds:>7.3f} "
                f"{base_time / seconds:>5.2f}x"
            )


if __name__ == "__main__":
    main()
