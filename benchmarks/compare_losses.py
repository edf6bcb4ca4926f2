"""Compare GRPO, DAPO and the RPG variants on the embedded task, over seeds.

Each (variant, seed) is a full `megatron-rpg train` run of examples/tiny_cpu.yaml with the
variant's overrides, in OUT/runs/<variant>/seed<S>/ (metrics.jsonl, manifest.json with the
resolved config, versions, git revision and file hashes, config.yaml to rerun it exactly:
`megatron-rpg train --config OUT/runs/<variant>/seed<S>/config.yaml`). Then:

  OUT/table.md     final reward (mean over the last 10% of steps; mean +- std over seeds), steps
                   until the 20-step moving average of the reward reaches 0.8, KL (k3) and
                   entropy over the last 10% of steps
  OUT/results.json the same numbers per run
  OUT/curves.png   mean reward over seeds per variant (one panel each, in table order)

  python benchmarks/compare_losses.py --out runs/compare [--steps 300 --seeds 1,2,3]
      [--variants grpo,dapo,...] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_rpg.plot import write_curves_png  # noqa: E402

RPG = ("fkl", "rkl", "ufkl", "urkl")
VARIANTS = {  # the baselines as the paper ran them (Tables 5, 7, 8; verl's GRPO and DAPO)
    "grpo": [
        "algorithm.loss=grpo",
        "algorithm.advantage=group_mean_std",
        "loss.kl_anchor=ref",
        "algorithm.ref_update_interval=0",
        "loss.eps_high=0.2",
        "loss.beta=1e-3",
        "loss.dual_clip_c=.inf",
    ],
    "dapo": [
        "algorithm.loss=dapo",
        "loss.beta=0",
        "algorithm.dynamic_sampling=true",
        "loss.dual_clip_c=.inf",
    ],
    "reinforce_pp_baseline": [
        "algorithm.loss=reinforce_pp",
        "loss.beta=0",
        "algorithm.advantage=group_mean_whitened",
    ],
    **{f"rpg_{d}": [f"algorithm.loss=rpg_{d}"] for d in RPG},
    **{f"rpg_reinforce_{d}": [f"algorithm.loss=rpg_reinforce_{d}"] for d in RPG},
}  # RPG: RPG-Style Clip (loss.clip=dual) and beta from tiny_cpu.yaml


def run(variant: str, seed: int, steps: int, extra: list[str], out: Path) -> Path:
    run_dir = out / "runs" / variant / f"seed{seed}"
    command = [
        sys.executable, "-m", "megatron_rpg.cli", "train", "--config",
        str(ROOT / "examples" / "tiny_cpu.yaml"), f"seed={seed}", f"train_steps={steps}",
        f"logging.run_dir={run_dir}", "checkpoint.save_interval=0", "eval_interval=0",
        f"model.hf_config={ROOT / 'examples' / 'tiny_model'}", *VARIANTS[variant], *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{done.stderr[-3000:]}")
    return run_dir


def summarize(run_dir: Path) -> dict[str, float | None]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tail = records[-max(1, len(records) // 10) :]
    rewards = [r["reward/mean"] for r in records]
    reached = None
    for i in range(len(rewards)):
        window = rewards[max(0, i - 19) : i + 1]
        if len(window) == 20 and sum(window) / 20 >= 0.8:
            reached = records[i]["step"]
            break
    mean = lambda key: sum(r.get(key, 0.0) for r in tail) / len(tail)  # noqa: E731
    return {"final_reward": mean("reward/mean"), "steps_to_0.8": reached,
            "kl": mean("kl/k3"), "entropy": mean("entropy/mean")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    results: dict[str, dict[int, dict]] = {}
    curves = {}
    for variant in variants:
        results[variant] = {}
        per_seed = []
        for seed in seeds:
            run_dir = run(variant, seed, args.steps, args.set, out)
            results[variant][seed] = summarize(run_dir)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            per_seed.append([json.loads(x)["reward/mean"] for x in lines])
            print(f"{variant} seed {seed}: {results[variant][seed]}", flush=True)
        curves[variant] = [
            (i + 1, statistics.fmean(v)) for i, v in enumerate(zip(*per_seed, strict=True))
        ]
    rows = [
        "| variant | final reward | steps to 0.8 | KL (k3) | entropy |",
        "|---|---|---|---|---|",
    ]
    for variant, by_seed in results.items():
        finals = [r["final_reward"] for r in by_seed.values()]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        reached = [r["steps_to_0.8"] for r in by_seed.values()]
        steps = (f"{statistics.fmean([s for s in reached if s is not None]):.0f} "
                 f"({sum(s is not None for s in reached)}/{len(reached)} seeds)"
                 if any(s is not None for s in reached) else "not reached")  # fmt: skip
        kl = statistics.fmean(r["kl"] for r in by_seed.values())
        entropy = statistics.fmean(r["entropy"] for r in by_seed.values())
        rows.append(f"| {variant} | {statistics.fmean(finals):.3f} +- {spread:.3f} | {steps} "
                    f"| {kl:.2e} | {entropy:.3f} |")  # fmt: skip
    note = (f"{len(seeds)} seeds ({args.seeds}), {args.steps} steps each; "
            "examples/tiny_cpu.yaml with the variant's overrides.")  # fmt: skip
    table = "\n".join(rows) + f"\n\n{note}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_curves_png(out / "curves.png", curves)
    print(table)


if __name__ == "__main__":
    main()
