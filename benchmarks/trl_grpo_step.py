"""TRL's GRPOTrainer for one side of benchmarks/train_step.py: the same HF model, prompts (the
chat template around the problem), group size, response length, learning rate and micro-batch,
on the CPU in fp32; one optimizer step per `--prompts` x `--n` completions. Prints one JSON line:
median step seconds, generation seconds, and training tokens/s (prompt + completion tokens per
step, TRL's own count, over the step time). Runs in a virtualenv with `trl` (TRL pins its own
transformers range; ours stays untouched), e.g.

  python -m venv /tmp/trl && /tmp/trl/bin/pip install -c constraints/cpu.txt trl==1.16.0 \\
      torch==2.13.0 transformers accelerate datasets
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path


def last_number_reward(completions: list, answer: list[str], **_: object) -> list[float]:
    """1 when the completion's last number equals the answer (our `last_number` extraction)."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        rewards.append(float(bool(numbers) and float(numbers[-1]) == float(expected)))
    return rewards


def main() -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options = {
        "--model": str,
        "--data": str,
        "--steps": int,
        "--prompts": int,
        "--n": int,
        "--max-tokens": int,
        "--lr": float,
        "--micro-batch-size": int,
        "--beta": float,
        "--seed": int,
    }
    for name, kind in options.items():
        parser.add_argument(name, type=kind, required=True)
    args = parser.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line]
    dataset = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["problem"]}], "answer": str(r["answer"])}
            for r in rows
        ]
    )
    completions = args.prompts * args.n
    config = trl.GRPOConfig(
        output_dir="/tmp/trl_grpo_step",
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=completions // args.micro_batch_size,
        num_generations=args.n,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        beta=args.beta,
        max_steps=args.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    generation = [0.0]
    generate = model.generate

    def timed_generate(*a: object, **k: object) -> object:
        start = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            generation[0] += time.perf_counter() - start

    model.generate = timed_generate  # type: ignore[method-assign]
    steps: list[dict[str, float]] = []

    class StepTimes(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, _args: object, state: object, control: object, **_: object) -> None:
            self.start, self.tokens, generation[0] = time.perf_counter(), 0, 0.0
            self.seen = state.num_input_tokens_seen  # type: ignore[attr-defined]

        def on_step_end(self, _args: object, state: object, control: object, **_: object) -> None:
            steps.append(
                {
                    "step_s": time.perf_counter() - self.start,
                    "generation_s": generation[0],
                    "tokens": state.num_input_tokens_seen - self.seen,
                }
            )  # type: ignore[attr-defined]

    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=last_number_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimes()],
    )
    trainer.train()
    measured = steps[1:]  # the first step warms up

    def median(key: str) -> float:
        return statistics.median(s[key] for s in measured)

    print(
        json.dumps(
            {
                "version": trl.__version__,
                "steps": len(measured),
                "step_s": median("step_s"),
                "generation_s": median("generation_s"),
                "tokens": median("tokens"),
                "tokens_per_s": median("tokens") / median("step_s"),
            }
        )
    )


if __name__ == "__main__":
    main()
