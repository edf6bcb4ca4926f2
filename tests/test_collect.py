"""DAPO dynamic sampling in the rollout loop, without ranks: groups are kept on the spread of
their task scores (not of the shaped rewards), filler groups are marked, and a stop requested
during the rounds ends the rollout after the current round."""

import pytest

from megatron_rpg.rollout.protocol import Response, SamplingParams
from megatron_rpg.step.collect import (
    CollectSettings,
    RolloutStopped,
    collect_groups,
    groups_to_batch,
)


class Task:
    """Below 100, odd problems are always answered right, even ones never; from 100 on, half the
    samples of every group are right."""

    def batch(self, seed, position, count):
        return list(range(position, position + count))

    def prompt(self, problem):
        return str(problem)

    def answer(self, problem):
        return "1" if problem % 2 or problem >= 100 else "0"


class Tokenizer:
    def encode_prompt(self, text):
        return [int(text)]

    def decode(self, token_ids):
        return "1" if token_ids[0] % 2 else "9"  # odd first token: answers "1"


def generate(prompts, params):
    """n responses per prompt; lengths differ inside every group (1, 2, 3 ... tokens)."""
    out = []
    for (problem,) in prompts:
        first = [problem] * params.n if problem < 100 else [1, 2] * (params.n // 2)
        out.append(
            [Response([first[i]] + [0] * i, [0.0] * (i + 1), "stop") for i in range(params.n)]
        )
    return out


def grade(items):
    return [float(text == answer) for text, answer in items]


def settings(prompts, max_rounds, overlong_buffer=3):
    params = SamplingParams(n=4, max_tokens=4)
    return CollectSettings(
        prompts=prompts,
        params=params,
        dynamic_sampling=True,
        max_rounds=max_rounds,
        overlong_buffer=overlong_buffer,
    )


def test_groups_are_filtered_on_accuracy_not_on_the_shaped_reward():
    """Problems 0..99 give all-right or all-wrong groups whose overlong shaping differs by
    length: they carry no signal and are dropped (they used to pass the filter)."""
    groups, metrics, position = collect_groups(
        Task(), Tokenizer(), generate, grade, settings(2, 8), seed=0, step=0, position=98
    )
    assert [g.prompt for g in groups] == [[100], [101]]
    assert all(len(set(g.scores)) > 1 and not g.filler for g in groups)
    assert metrics["dynamic/dropped_groups"] == 2  # 98 (all wrong) and 99 (all right)
    assert metrics["dynamic/filler_groups"] == 0 and position == 102
    assert metrics["reward/sampled_accuracy"] == (4 + 2 + 2) / 16  # 99 right, 100 and 101 half


def test_a_step_out_of_rounds_marks_its_filler_groups():
    groups, metrics, _ = collect_groups(
        Task(), Tokenizer(), generate, grade, settings(3, 2), seed=0, step=0, position=0
    )
    assert len(groups) == 3 and all(g.filler for g in groups)
    assert metrics["dynamic/rounds"] == 2 and metrics["dynamic/filler_groups"] == 3
    # the shaped rewards of the all-wrong problem 0 differ (lengths 1..4, buffer 3): no signal
    assert len(set(groups[0].scores)) == 1 and len(set(groups[0].rewards)) > 1


def test_the_batch_masks_filler_groups_out_of_the_loss():
    """The trainer's rollout without ranks: one round keeps problem 100 (half right) and fills
    with the dropped 99 (all right), whose tokens take no part in the loss."""
    groups, metrics, position = collect_groups(
        Task(), Tokenizer(), generate, grade, settings(2, 1), seed=0, step=0, position=99
    )
    batch = groups_to_batch(groups, pad_id=0)
    assert metrics["dynamic/filler_groups"] == 1 and position == 101
    assert batch.tokens[:, 0].tolist() == [100] * 4 + [99] * 4  # kept first, then the filler
    masked = batch.response_mask.sum(dim=1).tolist()
    assert masked == [1, 2, 3, 4, 0, 0, 0, 0]
    assert batch.rewards[0] == 1.0 and batch.rewards[1] < 0  # right and short; wrong


class LongPrompts(Tokenizer):
    """Problems divisible by 3 encode to 10 tokens, the others to 1."""

    def encode_prompt(self, text):
        return [int(text)] * (10 if int(text) % 3 == 0 else 1)


def test_a_stop_requested_during_dynamic_sampling_ends_the_rollout_after_that_round():
    """Problems 0..99 carry no signal, so this step would take all 8 rounds; a stop requested
    (the trainer's collective signal check) after the second ends it there."""
    calls = []

    def counted(prompts, params):
        calls.append(params.seed)
        return generate(prompts, params)

    asked = []

    def stop_requested():
        asked.append(len(calls))
        return len(calls) == 2

    with pytest.raises(RolloutStopped, match="round 2"):
        collect_groups(
            Task(),
            Tokenizer(),
            counted,
            grade,
            settings(2, 8),
            seed=0,
            step=0,
            position=0,
            stop_requested=stop_requested,
        )
    assert len(calls) == 2 and asked == [1, 2] and calls[0] != calls[1]
    groups, metrics, _ = collect_groups(
        Task(),
        Tokenizer(),
        generate,
        grade,
        settings(2, 8),
        seed=0,
        step=0,
        position=0,
        stop_requested=lambda: False,
    )
    assert metrics["dynamic/rounds"] == 8 and len(groups) == 2  # never stopped: every round


def test_prompts_over_max_prompt_tokens_are_skipped_and_counted():
    from megatron_rpg.config import ConfigError

    limited = CollectSettings(
        prompts=4, params=SamplingParams(n=2, max_tokens=4), max_prompt_tokens=5
    )
    groups, metrics, position = collect_groups(
        Task(), LongPrompts(), generate, grade, limited, seed=0, step=0, position=0
    )
    assert [g.prompt[0] for g in groups] == [1, 2, 4, 5]  # 0 and 3 skipped
    assert metrics["data/skipped_long_prompts"] == 2 and position == 6
    with pytest.raises(ConfigError, match=r"data\.max_prompt_tokens"):
        collect_groups(
            Task(),
            LongPrompts(),
            generate,
            grade,
            CollectSettings(prompts=2, params=limited.params, max_prompt_tokens=0),
            seed=0,
            step=0,
            position=0,
        )


def test_incorrect_reward_sets_the_scale_and_the_filter_still_reads_the_grades():
    """DAPO's scorer: +1 right, -1 wrong, then the overlong shaping on top."""
    from dataclasses import replace

    signed = replace(settings(1, 8, overlong_buffer=2), incorrect_reward=-1.0)
    (group,), _, _ = collect_groups(
        Task(), Tokenizer(), generate, grade, signed, seed=0, step=0, position=100
    )
    assert group.scores == [1.0, 0.0, 1.0, 0.0]  # lengths 1..4 of max_tokens 4, buffer 2
    assert group.rewards == [1.0, -1.0, 1.0 - 0.5, -1.0 - 1.0]
