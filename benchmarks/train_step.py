"""One RL step of the tiny embedded run, phase by phase, side by side with this machine's matmul
speed measured in the same run:

  time per phase (rollout, log-probs, update, sync), median over steps; training tokens/s;
  achieved FLOP/s of the update (6 N tokens / update time, N = parameters in matmuls) as a
  ratio of a plain fp32 matmul's FLOP/s (2048 x 2048 x 2048, best of 5).

  python benchmarks/train_step.py [--steps 12] [key=value config overrides]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def matmul_flops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def measure(steps: int, overrides: list[str], run_dir: str) -> dict:
    from megatron_rpg.config import load_config
    from megatron_rpg.models.builder import unwrap
    from megatron_rpg.trainer import Trainer

    config = load_config(ROOT / "examples" / "tiny_cpu.yaml", [
        f"model.hf_config={ROOT / 'examples' / 'tiny_model'}", "sft.steps=30",
        f"train_steps={steps + 2}", "eval_interval=0", "checkpoint.save_interval=0",
        f"logging.run_dir={run_dir}", *overrides,
    ])  # fmt: skip
    trainer = Trainer(config)
    gpt = unwrap(trainer.policy[0])
    matmul_params = sum(p.numel() for n, p in gpt.named_parameters()
                        if "word_embeddings" not in n and p.dim() == 2)  # fmt: skip
    history = [trainer.train_step() for _ in range(steps + 2)][2:]  # 2 warm-up steps
    tokens = config.data.prompts_per_step * config.rollout.n  # sequences per step
    return {"history": history, "matmul_params": matmul_params, "sequences": tokens,
            "matmul_flops": matmul_flops()}  # fmt: skip


def main() -> None:
    import tempfile

    from megatron_rpg.parallel import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        (r,) = run_on_ranks(1, measure, args.steps, args.overrides, run_dir)
    history = r["history"]

    def median(key: str) -> float:
        return statistics.median(h[key] for h in history)

    step_s = median("time/step")
    trained_tokens = median("throughput/tokens_per_s") * step_s  # prompt + response per step
    update_s = median("time/update")
    achieved = 6 * r["matmul_params"] * trained_tokens / update_s
    print(f"tiny model: {r['matmul_params']:,} matmul parameters; {r['sequences']} sequences "
          f"per step, ~{trained_tokens:.0f} tokens; median of {len(history)} steps")  # fmt: skip
    for phase in ("rollout", "logprobs", "update", "sync"):
        seconds = median(f"time/{phase}")
        print(f"  {phase:<9} {seconds * 1e3:8.1f} ms  ({seconds / step_s:5.1%} of the step)")
    print(f"  step      {step_s * 1e3:8.1f} ms   training tokens/s {trained_tokens / step_s:,.0f}")
    peak = r["matmul_flops"]
    print(
        f"update: {achieved / 1e9:.2f} GFLOP/s achieved vs {peak / 1e9:.1f} GFLOP/s fp32 "
        f"matmul = {achieved / peak:.3f} of this machine's measured matmul rate"
    )


if __name__ == "__main__":
    main()
