"""The collect stage of an RL step: sample n responses per prompt, grade them, shape the rewards,
and (DAPO dynamic sampling) replace the response groups that carry no signal. No process groups
here: the trainer passes `generate` and `grade` (rollout/service.py), which on several ranks are
collective and return the same on every rank, so every rank runs this loop in lockstep and ends
with the same response groups.

    settings = CollectSettings.of(config.rollout, config.data, config.algorithm, eos_id)
    collected = collect(task, tokenizer, generate, grade, settings, seed=..., step=...,
                        position=...)   # .batch (step/batch.py), .metrics, .position

With dynamic sampling, a group whose task scores are all equal (all right or all wrong, as
DAPO's filter on accuracy; the overlong shaping may still differ) carries no signal: it is
dropped and further prompts are drawn, for up to `max_rounds` rounds; then the batch is filled
with dropped groups marked `filler`, which keep the batch's shape but take no part in the loss
(the trainer masks their tokens out of the token mean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from megatron_rpg.data.task import Task
from megatron_rpg.rewards import overlong_penalty, task_reward
from megatron_rpg.rollout.protocol import Response, SamplingParams
from megatron_rpg.step.batch import RolloutBatch, build_batch

if TYPE_CHECKING:
    from megatron_rpg.config import AlgorithmConfig, DataConfig, RolloutConfig

Generate = Callable[[Sequence[Sequence[int]], SamplingParams], list[list[Response]]]
Grade = Callable[[list[tuple[str, Any]]], list[float]]


class RolloutStopped(Exception):
    """A stop was requested during the rollout: the step's samples are abandoned."""


@dataclass(frozen=True)
class CollectSettings:
    prompts: int  # groups per step
    params: SamplingParams  # n, temperature, ...; the seed is set per round
    dynamic_sampling: bool = False
    max_rounds: int = 1
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    incorrect_reward: float = 0.0  # the task reward of a wrong answer (right: 1)
    max_prompt_tokens: int | None = None  # longer prompts are skipped (and counted)

    @classmethod
    def of(
        cls, rollout: RolloutConfig, data: DataConfig, algorithm: AlgorithmConfig, eos_id: int
    ) -> CollectSettings:
        """The settings of the rollout, data and algorithm sections."""
        return cls(
            prompts=data.prompts_per_step,
            params=SamplingParams(
                n=rollout.n,
                temperature=rollout.temperature,
                top_p=rollout.top_p,
                top_k=rollout.top_k,
                max_tokens=rollout.max_tokens,
                stop_token_ids=(eos_id,),
            ),
            dynamic_sampling=algorithm.dynamic_sampling,
            max_rounds=algorithm.dynamic_sampling_max_rounds,
            overlong_buffer=algorithm.overlong_buffer,
            overlong_penalty=algorithm.overlong_penalty,
            incorrect_reward=algorithm.incorrect_reward,
            max_prompt_tokens=data.max_prompt_tokens,
        )


@dataclass
class ResponseGroup:
    prompt: list[int]
    responses: list[Response]
    rewards: list[float]  # scores on the reward scale plus the overlong shaping
    scores: list[float]  # the task's grades
    filler: bool = False  # dynamic sampling ran out of rounds: no part in the loss


def round_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of a step's round: distinct for every (seed, step, round)."""
    return (seed * 1_000_003 + step) * 64 + round_


def grade_groups(
    problems: list[Any],
    response_groups: list[list[Response]],
    task: Task,
    tokenizer: Any,
    grade: Grade,
    settings: CollectSettings,
) -> list[tuple[list[float], list[float]]]:
    """Per group: (task scores, rewards = scores on the reward scale (rewards/shaping.py) plus
    DAPO's overlong shaping), per response."""
    items = [
        (tokenizer.decode(r.token_ids), task.answer(problem))
        for problem, group in zip(problems, response_groups, strict=True)
        for r in group
    ]
    scores = iter(grade(items))
    limit = settings.params.max_tokens
    out = []
    for group in response_groups:
        group_scores = [next(scores) for _ in group]
        shaping = [
            overlong_penalty(
                len(r.token_ids), limit, settings.overlong_buffer, settings.overlong_penalty
            )
            for r in group
        ]
        rewards = [
            task_reward(s, settings.incorrect_reward) + p
            for s, p in zip(group_scores, shaping, strict=True)
        ]
        out.append((group_scores, rewards))
    return out


SKIPPED_PER_PROMPT_LIMIT = 100  # then no prompt of the task fits: a config error, not bad luck


def draw_prompts(
    task: Task, tokenizer: Any, seed: int, position: int, count: int, max_tokens: int | None
) -> tuple[list[Any], list[list[int]], int, int]:
    """`count` problems whose encoded prompts have at most `max_tokens` tokens, in the task's
    order from `position` (longer ones are skipped, as verl's filter_overlong_prompts): the
    problems, their prompts, the position after them and how many were skipped."""
    problems: list[Any] = []
    prompts: list[list[int]] = []
    skipped = 0
    while len(problems) < count:
        batch = task.batch(seed, position, count - len(problems))
        position += len(batch)
        for problem in batch:
            prompt = tokenizer.encode_prompt(task.prompt(problem))
            if max_tokens is not None and len(prompt) > max_tokens:
                skipped += 1
                continue
            problems.append(problem)
            prompts.append(prompt)
        if skipped > SKIPPED_PER_PROMPT_LIMIT * count:
            from megatron_rpg.config import ConfigError

            allowed = f"a length that some prompts fit ({skipped} in a row were longer)"
            raise ConfigError("data.max_prompt_tokens", max_tokens, allowed)
    return problems, prompts, position, skipped


def collect_groups(
    task: Task,
    tokenizer: Any,
    generate: Generate,
    grade: Grade,
    settings: CollectSettings,
    seed: int,
    step: int,
    position: int,
    stop_requested: Callable[[], bool] | None = None,
) -> tuple[list[ResponseGroup], dict[str, float], int]:
    """`settings.prompts` groups from the task's problems starting at `position`; the rollout
    metrics and the position after the prompts consumed. `stop_requested` (collective, like
    the rest) is asked after each sampling round: True raises RolloutStopped, so that a signal
    during a step of many dynamic-sampling rounds is acted on after the round, not the step."""
    kept: list[ResponseGroup] = []
    dropped: list[ResponseGroup] = []
    sampled: list[float] = []
    grades: list[float] = []
    rounds = skipped = 0
    while len(kept) < settings.prompts and rounds < max(settings.max_rounds, 1):
        need = settings.prompts - len(kept)
        problems, prompts, position, too_long = draw_prompts(
            task, tokenizer, seed, position, need, settings.max_prompt_tokens
        )
        skipped += too_long
        params = SamplingParams(
            **{**settings.params.__dict__, "seed": round_seed(seed, step, rounds)}
        )
        responses = generate(prompts, params)
        graded = grade_groups(problems, responses, task, tokenizer, grade, settings)
        for prompt, group, (scores, rewards) in zip(prompts, responses, graded, strict=True):
            sampled.extend(rewards)
            grades.extend(scores)
            uniform = len(set(scores)) == 1
            target = dropped if settings.dynamic_sampling and uniform else kept
            target.append(ResponseGroup(prompt, group, rewards, scores))
        rounds += 1
        if stop_requested is not None and stop_requested():
            raise RolloutStopped(f"stopped after sampling round {rounds}")
    fillers = [replace(g, filler=True) for g in dropped[: settings.prompts - len(kept)]]
    metrics = {
        "reward/sampled_mean": sum(sampled) / len(sampled),
        "reward/sampled_accuracy": sum(grades) / len(grades),  # every response graded this step
        "dynamic/rounds": float(rounds),
        "dynamic/dropped_groups": float(len(dropped)),
        "dynamic/filler_groups": float(len(fillers)),
        "data/skipped_long_prompts": float(skipped),
    }
    return kept + fillers, metrics, position


def groups_to_batch(response_groups: list[ResponseGroup], pad_id: int) -> RolloutBatch:
    """The update's batch (step/batch.py) of collected response groups: a filler group's tokens
    are masked out of the loss and its token mean."""
    batch = build_batch(
        [g.prompt for g in response_groups],
        [g.responses for g in response_groups],
        [g.rewards for g in response_groups],
        pad_id,
    )
    fillers = torch.tensor([g.filler for g in response_groups for _ in g.responses])
    batch.response_mask[fillers] = False
    return batch


@dataclass(frozen=True)
class Collected:
    batch: RolloutBatch  # the update's batch
    metrics: dict[str, float]
    position: int  # the task's data position after the prompts drawn


def collect(
    task: Task,
    tokenizer: Any,
    generate: Generate,
    grade: Grade,
    settings: CollectSettings,
    seed: int,
    step: int,
    position: int,
    stop_requested: Callable[[], bool] | None = None,
) -> Collected:
    """collect_groups, as the update's batch (a filler group's tokens masked out)."""
    response_groups, metrics, position = collect_groups(
        task, tokenizer, generate, grade, settings, seed, step, position, stop_requested
    )
    return Collected(groups_to_batch(response_groups, tokenizer.pad_id), metrics, position)
