"""One RL step, its stages in order (the paper's algorithm):

    collect (step/collect.py)          prompts -> rollout service -> graded response groups,
                                       the step's batch
    advantages (step/advantages.py)    outcome advantages per response group
    batch (step/batch.py)              this rank's length-bucketed micro-batches per mini-batch
    update (step/update.py)            pi_old's log-probs (skipped when a single on-policy
                                       update makes pi_old the policy) and the reference's
                                       (kl_anchor='ref'); REINFORCE++'s token advantages; for
                                       each of ppo_epochs, one optimizer step per mini-batch
    reference (step/reference.py)      the iterative reference update
    weight sync                        the rollout engine gets the new policy

inside a StepTransaction (step/transaction.py): a signal seen after a sampling round, after the
log-probs or between optimizer steps abandons the step with the run's state as at its start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from megatron_rpg.config import AlgorithmConfig, OptimizerConfig
from megatron_rpg.data.task import Task
from megatron_rpg.forward_backward import LogprobOptions, ScheduleTimes
from megatron_rpg.models import ModelArch
from megatron_rpg.models.builder import unwrap
from megatron_rpg.parallel import ParallelLayout
from megatron_rpg.rollout.service import RolloutService
from megatron_rpg.step.advantages import (
    TOKEN_LEVEL,
    reinforce_pp_token_advantages,
    sequence_advantages,
)
from megatron_rpg.step.batch import RolloutBatch, mini_batches
from megatron_rpg.step.collect import Collected, CollectSettings, RolloutStopped, collect
from megatron_rpg.step.counters import RunCounters
from megatron_rpg.step.reference import ReferenceSchedule
from megatron_rpg.step.transaction import StepTransaction
from megatron_rpg.step.update import (
    Losses,
    PassStopped,
    attach_logprobs,
    pipeline_bubble,
    reduce_metrics,
    update_policy,
)


@dataclass
class RLStep:
    """The step's components, each built by the trainer; `run` is one step."""

    algorithm: AlgorithmConfig
    optimizer_config: OptimizerConfig
    stop_in_update: bool  # checkpoint.stop_in_update
    seed: int
    arch: ModelArch
    policy: list[Any]  # DDP-wrapped model chunks
    optimizer: Any
    scheduler: Any  # the optimizer's LR schedule
    reference: ReferenceSchedule
    rollout: RolloutService
    task: Task
    tokenizer: Any
    sampling: CollectSettings
    layout: ParallelLayout
    options: LogprobOptions
    counters: RunCounters

    def collect(self, transaction: StepTransaction | None = None) -> Collected:
        """Every rank in lockstep: sample and grade the step's response groups; with a
        transaction, a signal after a sampling round abandons the step."""
        start = time.perf_counter()
        asked = None if transaction is None else transaction.stop_requested
        try:
            collected = collect(
                self.task, self.tokenizer, self.rollout.generate, self.rollout.grade,
                self.sampling, seed=self.seed, step=self.counters.step,
                position=self.counters.data_position, stop_requested=asked,
            )  # fmt: skip
        except RolloutStopped:
            assert transaction is not None  # collect looks only when there is one
            raise transaction.abandon("in its rollout") from None
        collected.metrics["time/rollout"] = time.perf_counter() - start
        return collected

    def run(self, transaction: StepTransaction, losses: Losses) -> dict[str, float]:
        """One step: collect, update (the colocated engine asleep meanwhile), weight sync; the
        step's metrics."""
        start = time.perf_counter()
        collected = self.collect(transaction)
        self.counters.data_position = collected.position
        self.rollout.sleep()  # a colocated engine frees its memory for training
        try:
            metrics = self.update(collected.batch, transaction, losses)
        finally:
            self.rollout.wake()
        sync = self.rollout.sync_weights(self.policy, self.arch, self.layout.groups)
        end = time.perf_counter()
        batch = collected.batch
        tokens = float(batch.prompt_lengths.sum() + batch.response_lengths.sum())
        return {
            "reward/mean": float(batch.rewards.mean()),
            "reward/std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
            "response/length_mean": float(batch.response_lengths.float().mean()),
            "response/truncated": float(batch.truncated.float().mean()),
            **metrics,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "skipped_steps": float(self.counters.skipped_steps),
            **self.rollout.stats(),
            **collected.metrics,
            "time/sync": sync.seconds,
            "time/step": end - start,
            "throughput/tokens_per_s": tokens / (end - start),  # prompt + response tokens
        }

    def update(
        self, batch: RolloutBatch, transaction: StepTransaction, losses: Losses
    ) -> dict[str, float]:
        """Advantages, mini-batches, log-probs, optimizer steps and the reference update; the
        update's metrics reduced over ranks."""
        a, o, groups = self.algorithm, self.optimizer_config, self.layout.groups
        advantages = sequence_advantages(a.advantage, batch)
        device = next(self.policy[0].parameters()).device
        minis = mini_batches(
            batch, advantages, o.mini_batch_size, o.micro_batch_size, self.layout, device
        )
        token_level = a.advantage in TOKEN_LEVEL  # needs the old log-probs: below
        asked = transaction.stop_requested
        logprob_start = time.perf_counter()
        times = ScheduleTimes()  # every schedule of the step: its pipeline bubble
        try:
            if a.ppo_epochs > 1 or len(minis) > 1 or token_level:  # else pi_old is the policy
                attach_logprobs(
                    self.policy, minis, "old_logprobs", self.options, groups, asked, times
                )
            if self.reference.reference is not None:
                chunks = self.reference.reference.chunks
                attach_logprobs(chunks, minis, "ref_logprobs", self.options, groups, asked, times)
        except PassStopped as stopped:
            raise transaction.abandon(f"in its log-probs, {stopped}") from None
        if token_level:
            minis = reinforce_pp_token_advantages(minis, a.kl_in_reward, groups.dp)
        transaction.check("before its update")
        update_start = time.perf_counter()
        steps = a.ppo_epochs * len(minis)
        between = transaction.guard_update(
            self.policy, self.optimizer, self.scheduler, steps, self.stop_in_update
        )
        self.scheduler.step(1)  # step k of the warm-up runs at lr * k / warmup_steps (k >= 1)
        try:
            metrics, grad_norms, skipped = update_policy(
                self.policy, self.optimizer, minis, self.options, groups, a.ppo_epochs, losses,
                stop_requested=between, times=times,
            )  # fmt: skip
        except PassStopped as stopped:
            raise transaction.abandon(f"in its update, {stopped}") from None
        update_end = time.perf_counter()
        self.counters.skipped_steps += skipped
        self.counters.step += 1
        last_stage = unwrap(self.policy[-1]).post_process
        step_metrics = reduce_metrics(metrics, grad_norms, steps, self.layout, last_stage)
        if self.layout.pipeline_parallel > 1:
            step_metrics["perf/pipeline_bubble"] = pipeline_bubble(times)
        optimizer_steps = self.counters.step * steps
        self.reference.after_step(self.policy, optimizer_steps, step_metrics["kl/k3"])
        step_metrics["time/logprobs"] = update_start - logprob_start
        step_metrics["time/update"] = update_end - update_start
        return step_metrics
