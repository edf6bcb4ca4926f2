"""Benchmark evaluation: AIME24/25, AMC23, MATH-500, GSM8K with mean@k, pass@k and maj@k.

    problems = load_benchmark("aime24")                       # package data: 30 problems
    results = evaluate({"aime24": problems}, generate, k=32, pool=GraderPool())
    print(to_markdown(results))

`generate(prompts, k)` returns k response texts per prompt (any rollout engine). Each response
is graded in the sandbox (rewards/sandbox.py, math-verify). For a problem with n = k graded
samples of which c are correct:

    mean@k = c / n                      (the RPG paper's metric, averaged over problems)
    pass@k = 1 - C(n - c, k) / C(n, k)  (unbiased, Chen et al. 2021; here with n = k: c > 0)
    maj@k  = 1 if the most frequent extracted answer (ties: the first seen) is correct

and each is averaged over problems, with a percentile bootstrap 95% interval over problems.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from megatron_rpg.data import PROMPT_TEMPLATES

# the benchmarks' names and files live in data/; re-exported for evaluation's users
from megatron_rpg.data.benchmarks import BENCHMARKS as BENCHMARKS
from megatron_rpg.data.benchmarks import DATA_DIR as DATA_DIR
from megatron_rpg.data.benchmarks import benchmark_name as benchmark_name
from megatron_rpg.data.benchmarks import load_benchmark as load_benchmark
from megatron_rpg.rewards.extract import extract_answer
from megatron_rpg.rewards.math import MATH_GRADERS
from megatron_rpg.rewards.sandbox import GraderPool
from megatron_rpg.rollout.protocol import SamplingParams
from megatron_rpg.rollout.text import Generates, TextGenerator

if TYPE_CHECKING:
    from megatron_rpg.config import DataConfig

Generate = Callable[[list[str], int], list[list[str]]]
EVAL_PROBLEMS = 256  # greedy_accuracy reads the task's first 256 problems


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: Sequence[str | None], scores: Sequence[float]) -> float:
    """Score of the most frequent extracted answer (None, no answer, never wins)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    winner = max(votes, key=lambda a: (votes[a], -answers.index(a)))
    return scores[answers.index(winner)]


def bootstrap_interval(
    values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over `values` (resampled with replacement)."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(samples))
    low = means[int((1 - level) / 2 * samples)]
    high = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return low, high


def score_benchmark(
    problems: list[dict[str, str]],
    responses: list[list[str]],
    k: int,
    pool: GraderPool,
    answer_extraction: str = "strict",
) -> dict[str, Any]:
    """Grade k responses per problem; answer_extraction 'last_number' reads a response that
    states no answer by its last number (rewards/extract.py)."""
    if len(responses) != len(problems) or any(len(r) != k for r in responses):
        raise ValueError(f"need {k} responses for each of the {len(problems)} problems")
    items = [
        (text, p["answer"]) for p, texts in zip(problems, responses, strict=True) for text in texts
    ]
    scores, stats = pool.grade(MATH_GRADERS[answer_extraction], items)
    last_number = answer_extraction == "last_number"
    per_problem: dict[str, list[float]] = {"mean": [], "pass": [], "maj": []}
    for i, texts in enumerate(responses):
        mine = scores[i * k : (i + 1) * k]
        correct = int(sum(mine))
        per_problem["mean"].append(correct / k)
        per_problem["pass"].append(pass_at_k(k, correct, k))
        answers = [extract_answer(t, last_number) for t in texts]
        per_problem["maj"].append(majority_correct(answers, mine))
    out: dict[str, Any] = {"problems": len(problems), "k": k, "grading": stats}
    for name, values in per_problem.items():
        out[f"{name}@{k}"] = sum(values) / len(values)
        out[f"{name}@{k}_ci95"] = bootstrap_interval(values)
    return out


def evaluate(
    benchmarks: dict[str, list[dict[str, str]]],
    generate: Generate,
    k: int,
    pool: GraderPool | None,
    answer_extraction: str = "strict",
    prompt_template: str = "dapo",
) -> dict[str, Any]:
    """Each benchmark's problems in `prompt_template` (data/math.py), k samples each, graded.
    pool None: generation only, nothing graded ({}): the ranks other than 0 of a collective
    engine, which take part in generating."""
    results = {}
    for name, problems in benchmarks.items():
        prompts = [PROMPT_TEMPLATES[prompt_template].format(problem=p["problem"]) for p in problems]
        texts = generate(prompts, k)
        if pool is not None:
            results[name] = score_benchmark(problems, texts, k, pool, answer_extraction)
    return results


def greedy_accuracy(
    task: Any,
    tokenizer: Any,
    engine: Generates,
    grade: Callable[[list[tuple[str, Any]]], list[float]],
    max_tokens: int,
) -> float:
    """Greedy accuracy over the task's first EVAL_PROBLEMS problems, in the training prompt.
    With a collective engine and grader (rollout/collective.py), on every rank."""
    problems = task.problems[:EVAL_PROBLEMS]
    prompts = [tokenizer.encode_prompt(task.prompt(p)) for p in problems]
    params = SamplingParams(
        top_k=1, max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_id,), seed=0
    )
    groups = engine.generate(prompts, params)
    texts = [tokenizer.decode(g[0].token_ids) for g in groups]
    scores = grade([(t, task.answer(p)) for p, t in zip(problems, texts, strict=True)])
    return sum(scores) / len(scores)


class RunEvaluation:
    """A run's periodic evaluation, every `interval` steps (0: never), with the rollout engine:
    greedy accuracy on the task's first problems (greedy_accuracy), and mean@k, pass@k and maj@k
    of `benchmarks` (comma-separated; the first `limit` problems of each, 0: all) sampled with
    `params`. Collective: rank 0 grades; the others get {} for the benchmarks."""

    def __init__(
        self,
        interval: int,
        benchmarks: str,
        k: int,
        limit: int,
        params: SamplingParams,
        data: DataConfig,
        task: Any,
        tokenizer: Any,
    ):
        self.interval, self.k, self.params, self.data = interval, k, params, data
        names = [n for n in benchmarks.split(",") if n]
        self.benchmarks = {name: load_benchmark(name)[: limit or None] for name in names}
        self.task, self.tokenizer = task, tokenizer

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def __call__(self, engine: Any) -> dict[str, float]:
        """`engine`: the rollout service (generate, grade, grader_pool)."""
        max_tokens = self.params.max_tokens
        accuracy = greedy_accuracy(self.task, self.tokenizer, engine, engine.grade, max_tokens)
        if not self.benchmarks:
            return {"eval/accuracy": accuracy}
        results = evaluate(
            self.benchmarks,
            TextGenerator(engine, self.tokenizer, self.params),
            self.k,
            engine.grader_pool,
            self.data.answer_extraction,
            self.data.prompt_template,
        )
        return {"eval/accuracy": accuracy, **benchmark_metrics(results, self.k)}


def benchmark_metrics(results: dict[str, Any], k: int) -> dict[str, float]:
    """evaluate()'s results as flat metrics: eval/<name>/mean@k and its _low/_high bounds, ..."""
    out = {}
    for name, result in results.items():
        for metric in ("mean", "pass", "maj"):
            key = f"eval/{benchmark_name(name)}/{metric}@{k}"
            out[key] = result[f"{metric}@{k}"]
            out[f"{key}_low"], out[f"{key}_high"] = result[f"{metric}@{k}_ci95"]
    return out


def to_markdown(results: dict[str, Any]) -> str:
    lines = ["| benchmark | problems | mean@k | pass@k | maj@k |", "|---|---|---|---|---|"]
    for name, r in results.items():
        k = r["k"]
        cells = [
            f"{r[f'{m}@{k}']:.4f} [{r[f'{m}@{k}_ci95'][0]:.3f}, {r[f'{m}@{k}_ci95'][1]:.3f}]"
            for m in ("mean", "pass", "maj")
        ]
        lines.append(f"| {name} | {r['problems']} | " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + f"\n\nk = {next(iter(results.values()))['k']}; 95% bootstrap intervals.\n"
    )


def compare_to_markdown(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Before/after table of the benchmarks in both: each metric with its interval, the change,
    and whether the two 95% intervals are disjoint (a rise or fall the resampling cannot undo)."""
    lines = [
        "| benchmark | metric | before | after | change | intervals disjoint |",
        "|---|---|---|---|---|---|",
    ]
    for name in (n for n in after if n in before):
        b, a = before[name], after[name]
        if a["k"] != b["k"] or a["problems"] != b["problems"]:
            raise ValueError(
                f"{name}: before has k={b['k']} on {b['problems']} problems, "
                f"after k={a['k']} on {a['problems']}"
            )
        for metric in (f"{m}@{a['k']}" for m in ("mean", "pass", "maj")):
            (bl, bh), (al, ah) = b[f"{metric}_ci95"], a[f"{metric}_ci95"]
            disjoint = "yes" if al > bh or ah < bl else "no"
            lines.append(
                f"| {name} | {metric} | {b[metric]:.4f} [{bl:.3f}, {bh:.3f}] | "
                f"{a[metric]:.4f} [{al:.3f}, {ah:.3f}] | {a[metric] - b[metric]:+.4f} "
                f"| {disjoint} |"
            )
    return "\n".join(lines) + "\n"
