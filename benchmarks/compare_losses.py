"""Compare GRPO, DAPO, REINFORCE++-Baseline and the RPG variants over seeds.

Each (variant, seed) is a full `megatron-rpg train` run of --config (default examples/
tiny_cpu.yaml, the embedded task) with the variant's overrides, in OUT/runs/<variant>/seed<S>/
(metrics.jsonl, manifest.json with the resolved config, versions, git revision and file hashes,
config.yaml to rerun it exactly: `megatron-rpg train --config OUT/runs/<variant>/seed<S>/
config.yaml`). Then:

  OUT/table.md     final accuracy (every response graded in a step, mean over the last quarter
                   of the steps; mean over seeds with a 95% t-interval across seeds), steps until
                   the moving average (a quarter of the steps) reaches --threshold, KL (k3) and
                   entropy over the last quarter
  OUT/results.json the same numbers per run
  OUT/curves.png   accuracy, KL and entropy per step, variants overlaid: mean over seeds, band
                   from the lowest to the highest seed

  python benchmarks/compare_losses.py --out runs/compare [--steps 300 --seeds 1,2,3]
      [--config examples/smollm2_cpu.yaml] [--variants grpo,dapo,...] [--threshold 0.8]
      [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_rpg.run.plot import write_curves_png  # noqa: E402

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


TINY = ROOT / "examples" / "tiny_cpu.yaml"
ACCURACY = "reward/sampled_accuracy"
CURVES = (ACCURACY, "kl/k3", "entropy/mean")


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: bisection on its CDF,
    0.5 + the density's integral from 0 (Simpson's rule, 2000 intervals)."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        density = [scale * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        odd, even = sum(density[1:-1:2]), sum(density[2:-1:2])
        return 0.5 + h / 3 * (density[0] + 4 * odd + 2 * even + density[-1])

    low, high = 0.0, 20.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < 0.975 else (low, middle)
    return (low + high) / 2


def run(variant: str, seed: int, steps: int, config: Path, extra: list[str], out: Path) -> Path:
    run_dir = out / "runs" / variant / f"seed{seed}"
    tiny = [f"model.hf_config={ROOT / 'examples' / 'tiny_model'}"] if config == TINY else []
    command = [
        sys.executable,
        "-m",
        "megatron_rpg.cli",
        "train",
        "--config",
        str(config),
        f"seed={seed}",
        f"train_steps={steps}",
        f"logging.run_dir={run_dir}",
        "checkpoint.save_interval=0",
        "eval_interval=0",
        *tiny,
        *VARIANTS[variant],
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{done.stderr[-3000:]}")
    return run_dir


def summarize(run_dir: Path, threshold: float) -> dict[str, float | None]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    window = max(1, len(records) // 4)
    tail = records[-window:]
    accuracy = [r[ACCURACY] for r in records]
    reached = next(
        (
            records[i]["step"]
            for i in range(window - 1, len(records))
            if statistics.fmean(accuracy[i - window + 1 : i + 1]) >= threshold
        ),
        None,
    )
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in tail)  # noqa: E731
    return {
        "final_accuracy": mean(ACCURACY),
        "steps_to_threshold": reached,
        "kl": mean("kl/k3"),
        "entropy": mean("entropy/mean"),
    }


def interval(values: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean across seeds (0 width for one seed)."""
    if len(values) < 2:
        return values[0], values[0]
    half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return statistics.fmean(values) - half, statistics.fmean(values) + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", type=Path, default=TINY)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    config = args.config.resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    results: dict[str, dict[int, dict]] = {}
    panels: dict[str, dict[str, list[tuple[float, ...]]]] = {key: {} for key in CURVES}
    for variant in variants:
        results[variant] = {}
        per_seed = []
        for seed in seeds:
            run_dir = run(variant, seed, args.steps, config, args.set, out)
            results[variant][seed] = summarize(run_dir, args.threshold)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            per_seed.append([json.loads(x) for x in lines])
            print(f"{variant} seed {seed}: {results[variant][seed]}", flush=True)
        for key in CURVES:
            panels[key][variant] = [
                (i + 1, statistics.fmean(v), min(v), max(v))
                for i, v in enumerate(zip(*([r[key] for r in s] for s in per_seed), strict=True))
            ]
    rows = [
        f"| variant | final accuracy (95% interval) | steps to {args.threshold} | KL (k3) "
        "| entropy |",
        "|---|---|---|---|---|",
    ]
    for variant, by_seed in results.items():
        finals = [r["final_accuracy"] for r in by_seed.values()]
        low, high = interval(finals)
        reached = [r["steps_to_threshold"] for r in by_seed.values()]
        steps = (
            f"{statistics.fmean([s for s in reached if s is not None]):.0f} "
            f"({sum(s is not None for s in reached)}/{len(reached)} seeds)"
            if any(s is not None for s in reached)
            else "not reached"
        )
        kl = statistics.fmean(r["kl"] for r in by_seed.values())
        entropy = statistics.fmean(r["entropy"] for r in by_seed.values())
        rows.append(
            f"| {variant} | {statistics.fmean(finals):.3f} ({low:.3f}, {high:.3f}) "
            f"| {steps} | {kl:.2e} | {entropy:.3f} |"
        )
    note = (
        f"{len(seeds)} seeds ({args.seeds}), {args.steps} steps each; {config.name} with the "
        f"variant's overrides{' and ' + ' '.join(args.set) if args.set else ''}."
    )
    table = "\n".join(rows) + f"\n\n{note}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_curves_png(
        out / "curves.png",
        panels,
        title=f"{config.name}: mean over seeds, band = lowest to highest seed",
    )
    print(table)


if __name__ == "__main__":
    main()
