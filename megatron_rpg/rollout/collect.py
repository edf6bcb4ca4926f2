"""One step's rollout: sample n responses per prompt, grade them, shape the rewards, and (DAPO
dynamic sampling) replace the groups that carry no signal. No process groups here: the
trainer passes `generate` and `grade`, which on several ranks are collective and return the
same on every rank, so every rank runs this loop in lockstep and ends with the same groups.

    groups, metrics, position = collect_groups(task, tokenizer, generate, grade, settings,
                                               seed=..., position=...)

With dynamic sampling, a group whose rewards are all equal has zero advantage under every
group baseline; it is dropped and further prompts are drawn, for up to `max_rounds` rounds;
then the batch is filled with dropped groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_rpg.rewards import overlong_penalty
from megatron_rpg.rollout.protocol import Response, SamplingParams

Generate = Callable[[Sequence[Sequence[int]], SamplingParams], list[list[Response]]]
Grade = Callable[[list[tuple[str, Any]]], list[float]]


@dataclass(frozen=True)
class CollectSettings:
    prompts: int  # groups per step
    params: SamplingParams  # n, temperature, ...; the seed is set per round
    dynamic_sampling: bool = False
    max_rounds: int = 1
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass
class Group:
    prompt: list[int]
    responses: list[Response]
    rewards: list[float]


def round_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of a step's round: distinct for every (seed, step, round)."""
    return (seed * 1_000_003 + step) * 64 + round_


def grade_groups(
    problems: list[Any],
    groups: list[list[Response]],
    task: Any,
    tokenizer: Any,
    grade: Grade,
    settings: CollectSettings,
) -> list[list[float]]:
    """Task reward plus DAPO overlong shaping, per response."""
    items = [
        (tokenizer.decode(r.token_ids), task.answer(problem))
        for problem, group in zip(problems, groups, strict=True)
        for r in group
    ]
    scores = iter(grade(items))
    limit = settings.params.max_tokens
    return [
        [
            next(scores)
            + overlong_penalty(
                len(r.token_ids), limit, settings.overlong_buffer, settings.overlong_penalty
            )
            for r in group
        ]
        for group in groups
    ]


def collect_groups(
    task: Any,
    tokenizer: Any,
    generate: Generate,
    grade: Grade,
    settings: CollectSettings,
    seed: int,
    step: int,
    position: int,
) -> tuple[list[Group], dict[str, float], int]:
    """`settings.prompts` groups from the task's problems starting at `position`; the rollout
    metrics and the position after the prompts consumed."""
    kept: list[Group] = []
    dropped: list[Group] = []
    sampled: list[float] = []
    rounds = 0
    while len(kept) < settings.prompts and rounds < max(settings.max_rounds, 1):
        need = settings.prompts - len(kept)
        problems = task.batch(seed, position, need)
        position += need
        prompts = [tokenizer.encode_prompt(task.prompt(p)) for p in problems]
        params = SamplingParams(
            **{**settings.params.__dict__, "seed": round_seed(seed, step, rounds)}
        )
        responses = generate(prompts, params)
        rewards = grade_groups(problems, responses, task, tokenizer, grade, settings)
        for prompt, group, group_rewards in zip(prompts, responses, rewards, strict=True):
            sampled.extend(group_rewards)
            uniform = len(set(group_rewards)) == 1
            target = dropped if settings.dynamic_sampling and uniform else kept
            target.append(Group(prompt, group, group_rewards))
        rounds += 1
    kept += dropped[: settings.prompts - len(kept)]
    metrics = {
        "reward/sampled_mean": sum(sampled) / len(sampled),
        "dynamic/rounds": float(rounds),
        "dynamic/dropped_groups": float(len(dropped)),
    }
    return kept, metrics, position
