"""One RL step, phase by phase, with what this machine allows measured in the same run:

  time per phase (rollout, log-probs, update, sync), median over steps; training tokens/s;
  achieved FLOP/s of the update (6 N tokens / update time, N = parameters in matmuls) as a
  ratio of a plain fp32 matmul's FLOP/s (2048 x 2048 x 2048, best of 5);
  the update's forward/backward on one step's batch: ours (length-bucketed micro-batches, the
  output layer on the response tokens only, the loss's gradients through it in the forward pass)
  against the same with the output layer on every position, with it recomputed in backward, and
  against micro-batches padded to the batch's width;
  with --trl-python, TRL's GRPOTrainer on the same model, data and settings
  (benchmarks/trl_grpo_step.py, in the virtualenv that has TRL).

  python benchmarks/train_step.py [--config examples/tiny_cpu.yaml] [--steps 12] [key=value ...]
  python benchmarks/train_step.py --config examples/smollm2_cpu.yaml --steps 3 \\
      --trl-python /path/to/trl-venv/bin/python        # after examples/smollm2_cpu.sh converted
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny_cpu.yaml"


def matmul_flops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def update_variants(trainer: Any) -> dict[str, float]:
    """Forward/backward of the update on one rollout batch, four ways: the trainer's
    (length-bucketed micro-batches, the output layer on the response tokens only, the loss's
    gradients through it in the forward pass); the same with the output layer on every position
    (prompt and padding too: forward_backward's scored_positions replaced by None, every
    position); with the output layer on every position and recomputed in backward
    (optimizer.loss_in_forward=false); and the same rows in row order padded to the batch's width
    with the recompute (the naive way). Alternated, the best of two runs each (whichever ran
    first alone would carry the first run's overheads and the machine's drift)."""
    import dataclasses
    from unittest import mock

    import torch

    from megatron_rpg import forward_backward as fb
    from megatron_rpg.forward_backward import forward_backward
    from megatron_rpg.losses import compute_advantages
    from megatron_rpg.step.batch import MiniBatch, length_bucketed
    from megatron_rpg.step.update import LossSettings, policy_losses

    c = trainer.config
    batch = trainer.rl_step.collect().batch
    advantages = compute_advantages(c.algorithm.advantage, batch.rewards, batch.group_ids)
    micro = c.optimizer.micro_batch_size

    def padded(index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "tokens": batch.tokens[index],
            "response_mask": batch.response_mask[index],
            "rollout_logprobs": batch.rollout_logprobs[index],
            "advantages": advantages[index],
        }

    def bucketed(index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**batch.rows(index), "advantages": advantages[index]}

    tokens, sequences = float(batch.response_mask.sum()), float(len(batch))
    bucketed_micros = [bucketed(rows) for rows in length_bucketed(batch.lengths(), micro)]
    padded_micros = [padded(rows) for rows in torch.arange(len(batch)).split(micro)]
    fused = LossSettings(c.algorithm.loss, c.loss, c.optimizer.loss_in_forward)
    recompute = dataclasses.replace(fused, in_forward=False)
    variants = {  # name: (mini-batch, loss settings, the output layer on every position)
        "in_forward": (MiniBatch(bucketed_micros, tokens, sequences), fused, False),
        "every_position": (MiniBatch(bucketed_micros, tokens, sequences), fused, True),
        "recompute": (MiniBatch(bucketed_micros, tokens, sequences), recompute, True),
        "padded": (MiniBatch(padded_micros, tokens, sequences), recompute, True),
    }
    out: dict[str, float] = {
        "tokens": float(batch.lengths().sum()),
        "response_tokens": tokens,
    }
    for _ in range(2):
        for name, (mini, settings, every_position) in variants.items():
            loss_fn, token_loss_fn = policy_losses(settings, mini)
            assert (token_loss_fn is not None) == (settings is fused)
            for chunk in trainer.policy:
                chunk.zero_grad_buffer()
            scoring = mock.patch.object(fb, "scored_positions", lambda batch: None)
            start = time.perf_counter()
            with scoring if every_position else contextlib.nullcontext():
                forward_backward(
                    trainer.policy, mini.micros, trainer.options, loss_fn, token_loss_fn
                )
            seconds = time.perf_counter() - start
            out[f"{name}_s"] = min(seconds, out.get(f"{name}_s", float("inf")))
            out[f"{name}_slots"] = float(sum(m["tokens"].numel() for m in mini.micros))
    return out


def measure(config_path: str, steps: int, overrides: list[str], run_dir: str) -> dict:
    from megatron_rpg.config import load_config
    from megatron_rpg.models.builder import unwrap
    from megatron_rpg.trainer import Trainer

    tiny = Path(config_path) == TINY
    base = [f"model.hf_config={ROOT / 'examples' / 'tiny_model'}", "sft.steps=30"] if tiny else []
    warmup = 2 if tiny else 1
    config = load_config(
        config_path,
        [
            *base,
            f"train_steps={steps + warmup + 1}",
            "eval_interval=0",
            "checkpoint.save_interval=0",
            f"logging.run_dir={run_dir}",
            *overrides,
        ],
    )
    trainer = Trainer(config)
    gpt = unwrap(trainer.policy[0])
    tied = gpt.share_embeddings_and_output_weights  # then the embedding is the output matmul
    matmul_params = sum(
        p.numel()
        for n, p in gpt.named_parameters()
        if p.dim() == 2 and (tied or "word_embeddings" not in n)
    )
    history = [trainer.train_step() for _ in range(steps + warmup)][warmup:]
    update = update_variants(trainer)
    trainer.close()
    sequences = config.data.prompts_per_step * config.rollout.n
    return {
        "history": history,
        "matmul_params": matmul_params,
        "sequences": sequences,
        "matmul_flops": matmul_flops(),
        "update": update,
    }


def trl_step(python: str, config_path: str, steps: int) -> dict[str, float]:
    """TRL's GRPOTrainer on the same model, data and settings, in its own virtualenv."""
    from megatron_rpg.config import load_config

    c = load_config(config_path)
    command = [
        python,
        str(ROOT / "benchmarks" / "trl_grpo_step.py"),
        "--model",
        c.model.hf_config,
        "--data",
        c.data.train_path,
        "--steps",
        str(steps),
        "--prompts",
        str(c.data.prompts_per_step),
        "--n",
        str(c.rollout.n),
        "--max-tokens",
        str(c.rollout.max_tokens),
        "--lr",
        str(c.optimizer.lr),
        "--micro-batch-size",
        str(c.optimizer.micro_batch_size),
        "--beta",
        str(c.loss.beta),
        "--seed",
        str(c.seed),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"TRL step failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    import tempfile

    from megatron_rpg.parallel import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--trl-python", help="python of a virtualenv with trl installed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        (r,) = run_on_ranks(1, measure, args.config, args.steps, args.overrides, run_dir)
    history = r["history"]

    def median(key: str) -> float:
        return statistics.median(h[key] for h in history)

    step_s = median("time/step")
    trained_tokens = median("throughput/tokens_per_s") * step_s  # prompt + response per step
    update_s = median("time/update")
    achieved = 6 * r["matmul_params"] * trained_tokens / update_s
    print(
        f"{Path(args.config).name}: {r['matmul_params']:,} matmul parameters; "
        f"{r['sequences']} sequences per step, ~{trained_tokens:.0f} tokens; median of "
        f"{len(history)} steps"
    )
    for phase in ("rollout", "logprobs", "update", "sync"):
        seconds = median(f"time/{phase}")
        print(f"  {phase:<9} {seconds:9.3f} s  ({seconds / step_s:5.1%} of the step)")
    ours = trained_tokens / step_s
    print(f"  step      {step_s:9.3f} s   training tokens/s {ours:,.1f}")
    peak = r["matmul_flops"]
    print(
        f"update: {achieved / 1e9:.2f} GFLOP/s achieved vs {peak / 1e9:.1f} GFLOP/s fp32 "
        f"matmul = {achieved / peak:.3f} of this machine's measured matmul rate"
    )
    u = r["update"]
    ours_s = u["in_forward_s"]
    print(
        f"update forward/backward on one batch ({u['tokens']:.0f} tokens, "
        f"{u['response_tokens']:.0f} of them response): ours (length-bucketed, "
        f"{u['in_forward_slots']:.0f} token slots; the output layer on the response tokens, "
        f"its loss gradients in the forward pass) {ours_s:.2f} s; the output layer on every "
        f"slot {u['every_position_s']:.2f} s: {u['every_position_s'] / ours_s:.2f}x; and "
        f"recomputed in backward {u['recompute_s']:.2f} s: {u['recompute_s'] / ours_s:.2f}x; "
        f"padded to the batch's width ({u['padded_slots']:.0f} slots) and recomputed "
        f"{u['padded_s']:.2f} s: {u['padded_s'] / ours_s:.2f}x"
    )
    if args.trl_python:
        trl = trl_step(args.trl_python, args.config, args.steps)
        print(
            f"TRL {trl['version']} GRPOTrainer, same model/data/settings: step "
            f"{trl['step_s']:.3f} s (generation {trl['generation_s']:.3f} s), training "
            f"tokens/s {trl['tokens_per_s']:,.1f}; ours / TRL = "
            f"{ours / trl['tokens_per_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
