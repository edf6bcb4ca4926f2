"""The RPG trainer: the RL loop of the paper (arXiv 2505.17508) on Megatron-Core.

One step (train_step):

    prompts --engine--> n responses each --grader--> rewards         (rollout/collect.py)
      --> advantages per group                                        (losses/advantages.py)
      --> old log-probs (skipped when a single on-policy update makes pi_old the current
          policy) and reference log-probs (kl_anchor='ref')
      --> for each of ppo_epochs, mini-batch updates of the configured loss  (update.py)
      --> iterative reference update (every K optimizer steps, or when the moving-average KL
          exceeds its target)
      --> weight sync into the engine --> periodic evaluation --> checkpoint

Every rank runs this. The rollout engine (rollout/placement.py) is the embedded one or a vLLM
server, driven by rank 0, which broadcasts what it returns, or vLLM colocated in every rank, each
engine sampling its share of the prompts; rank 0 grades (rollout/collective.py). Sampling is
seeded by (seed, step) and the data order by (seed, epoch), so a resumed run repeats the
uninterrupted one bit for bit. The trainer is Stateful: state_dict / load_state_dict hold its
counters, which the checkpoint saves next to the models and the optimizer.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpg.build import (
    build_tokenizer,
    check_batch_layout,
    make_optimizer,
    make_scheduler,
    model_hf_config,
    wrap_ddp,
)
from megatron_rpg.checkpoint import train_state
from megatron_rpg.checkpoint.mcore import load_mcore, model_files
from megatron_rpg.checkpoint.snapshot import UpdateSnapshot
from megatron_rpg.config import RunConfig, config_to_dict, config_yaml, save_config
from megatron_rpg.data import ArithmeticTask, Task, build_task
from megatron_rpg.evaluation import greedy_accuracy, run_benchmarks
from megatron_rpg.forward_backward import LogprobOptions, ScheduleTimes
from megatron_rpg.losses import compute_advantages
from megatron_rpg.manifest import write_manifest
from megatron_rpg.metrics import MetricsLog, check_logging
from megatron_rpg.models import ModelArch, ReferenceModel, build_model_chunks
from megatron_rpg.models.builder import resolve_dtype, unwrap
from megatron_rpg.parallel import initialize_model_parallel
from megatron_rpg.preemption import StopSignals, mark_stopped_early
from megatron_rpg.progress import Progress
from megatron_rpg.rewards.grader import TaskGrader
from megatron_rpg.rl_batch import RolloutBatch
from megatron_rpg.rollout import sync_weights
from megatron_rpg.rollout.build import build_engine
from megatron_rpg.rollout.collect import (
    RolloutStopped,
    collect_groups,
    collect_settings,
    groups_to_batch,
)
from megatron_rpg.rollout.collective import CollectiveEngine, on_rank0
from megatron_rpg.rollout.placement import rollout_placement
from megatron_rpg.sft import supervised_warmup
from megatron_rpg.update import (
    PassStopped,
    attach_logprobs,
    mini_batches,
    pipeline_bubble,
    policy_losses,
    reduce_metrics,
    reinforce_pp_advantages,
    update_policy,
)

KL_AVERAGE_DECAY = 0.9  # moving average of the step KL for the reference update trigger


class StepAbandoned(Exception):
    """A signal stopped a step before it was done; the run's state is that of its start."""


def signalled(stop: StopSignals) -> bool:
    """Collective: whether any rank received a signal."""
    return stop.check() is not None


def reference_update_due(
    optimizer_steps: int, interval: int, kl_average: float, kl_target: float
) -> bool:
    """Spec section 6, after a step: every `interval` optimizer steps (0: never), or when the
    moving-average KL(pi_theta || pi_ref) exceeds `kl_target` (0: off)."""
    every = interval > 0 and optimizer_steps % interval == 0
    return every or (kl_target > 0 and kl_average > kl_target)


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = c = config
        check_logging(c.logging)
        self.hf_config = model_hf_config(c.model.hf_config)
        self.arch = ModelArch.from_hf(self.hf_config)
        self.layout = initialize_model_parallel(c.parallel, c.seed)
        self.placement = rollout_placement(c.rollout, self.arch, self.layout.world_size)
        check_batch_layout(c.optimizer, self.layout.data_parallel)
        self.rank = dist.get_rank()
        self.run_dir = Path(c.logging.run_dir)
        self.task: Task = build_task(c.data)
        self.tokenizer = build_tokenizer(c, self.task, self.arch.vocab_size, self.run_dir)
        dtype = resolve_dtype(c.model.params_dtype)
        chunks = build_model_chunks(self.arch, c.parallel, dtype, layer_spec=c.model.layer_spec)
        if c.model.checkpoint:
            load_mcore(chunks, c.model.checkpoint)
        self.policy = wrap_ddp(chunks)
        self.optimizer = make_optimizer(
            self.policy, c.optimizer, c.optimizer.lr, c.optimizer.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, c.optimizer, c.train_steps)
        self.reference = None
        if c.loss.kl_anchor == "ref":
            ref_chunks = build_model_chunks(
                self.arch, c.parallel, dtype, layer_spec=c.model.layer_spec
            )
            self.reference = ReferenceModel(ref_chunks, self.policy)
        # every rank holding an engine receives the weights; generation: rollout/collective.py
        self.engine = CollectiveEngine(
            build_engine(c, self.placement, self.hf_config, self.run_dir, self.rank), self.rank
        )
        self.grader = TaskGrader(self.task.grader)  # rank 0's; the others get its grades
        self.options = LogprobOptions(self.arch.vocab_size, temperature=c.rollout.temperature)
        self.losses = functools.partial(policy_losses, c)  # per mini-batch (tests wrap it)
        self.step, self.skipped_steps, self.kl_average = 0, 0, 0.0
        self.data_position = 0  # prompts consumed so far (more than steps x prompts with DAPO)
        self.checkpointer = train_state.Checkpointer(
            self.run_dir,
            [unwrap(m) for m in self.policy],
            self.optimizer,
            self.reference.chunks if self.reference is not None else None,
            self,
            c.checkpoint,
            config_yaml(c),
            model_files(self.hf_config, self.tokenizer.path),
        )
        resumed = self._resume() if resume else False
        if not resumed and c.sft.steps and not c.model.checkpoint:
            self._supervised_warmup()
        self.log = None
        if self.rank == 0:
            self.log = MetricsLog(c.logging, self.run_dir, self.step, config_to_dict(c))
            save_config(c, self.run_dir / "config.yaml")
            paths = [Path(p) for p in (c.model.hf_config, c.data.train_path) if p]
            paths = [p / "config.json" if p.is_dir() else p for p in paths]
            write_manifest(
                self.run_dir / "manifest.json", config_to_dict(c), [self.tokenizer.path, *paths]
            )
        self._sync_weights()  # the engine starts from the policy

    def _supervised_warmup(self) -> None:
        c = self.config
        assert isinstance(self.task, ArithmeticTask)  # RunConfig.validate: sft needs it
        optimizer = make_optimizer(self.policy, c.optimizer, c.sft.lr, weight_decay=0.0)
        supervised_warmup(
            c.sft,
            self.policy,
            optimizer,
            self.task,
            self.tokenizer,
            self.layout,
            self.arch.vocab_size,
            c.seed,
            self.rank == 0,
        )
        if self.reference is not None:  # regularize toward the warmed-up model, not the
            self.reference.update_reference(self.policy)  # random one it started from

    def grade(self, items: list[tuple[str, Any]]) -> list[float]:
        """Collective: rank 0 grades (TaskGrader), every rank gets the scores."""
        return on_rank0(lambda: self.grader(items))

    def _sync_weights(self) -> Any:
        engine = self.engine.engine  # this rank's (None: the engine is on other ranks)
        return sync_weights(self.policy, self.arch, engine, groups=self.layout.groups)

    # ---------------------------------------------------------------------------- one step

    def rollout(self, stop: StopSignals | None = None) -> tuple[RolloutBatch, dict[str, float]]:
        """Every rank in lockstep: sample and grade the step's groups (rollout/collect.py);
        RolloutStopped when `stop` reports a signal after a sampling round."""
        start = time.perf_counter()
        settings = collect_settings(self.config, self.tokenizer.eos_id)
        groups, metrics, self.data_position = collect_groups(
            self.task,
            self.tokenizer,
            self.engine.generate,
            self.grade,
            settings,
            seed=self.config.seed,
            step=self.step,
            position=self.data_position,
            stop_requested=None if stop is None else functools.partial(signalled, stop),
        )
        metrics["time/rollout"] = time.perf_counter() - start
        return groups_to_batch(groups, self.tokenizer.pad_id), metrics

    def train_step(self, stop: StopSignals | None = None) -> dict[str, float]:
        """One RL step. With `stop`, a signal is looked at after each sampling round of the
        rollout, after the log-probs and between the update's optimizer steps (with
        checkpoint.stop_in_update): the step is abandoned (StepAbandoned) with the run's state
        put back to that of its start (weights, optimizer and scheduler from a host copy taken
        before the update; data position, RNG states), which a resumed run repeats: sampling is
        seeded by (seed, step)."""
        c, a, groups = self.config, self.config.algorithm, self.layout.groups
        start = time.perf_counter()
        rng, position = train_state.rng_state(), self.data_position
        try:
            batch, rollout_metrics = self.rollout(stop)
        except RolloutStopped:  # data_position is set only by a completed rollout
            train_state.set_rng_state(rng)
            raise StepAbandoned("in its rollout") from None
        engine = self.engine.engine

        def abandon(where: str) -> StepAbandoned:
            self.data_position = position
            train_state.set_rng_state(rng)
            if engine is not None:
                engine.wake()
            return StepAbandoned(where)

        if engine is not None:
            engine.sleep()  # a colocated engine frees its memory for training
        token_level = a.advantage == "reinforce_pp"  # needs the old log-probs: below
        advantages = batch.rewards
        if not token_level:
            advantages = compute_advantages(
                a.advantage, batch.rewards, batch.group_ids, response_mask=batch.response_mask
            )
        device = next(self.policy[0].parameters()).device
        minis = mini_batches(batch, advantages, c.optimizer, self.layout, device)
        logprob_start = time.perf_counter()
        signal = None if stop is None else functools.partial(signalled, stop)
        times = ScheduleTimes()  # every schedule of the step: its pipeline bubble
        try:
            if a.ppo_epochs > 1 or len(minis) > 1 or token_level:  # else pi_old is the policy
                attach_logprobs(
                    self.policy, minis, "old_logprobs", self.options, groups, signal, times
                )
            if self.reference is not None:
                chunks = self.reference.chunks
                attach_logprobs(chunks, minis, "ref_logprobs", self.options, groups, signal, times)
        except PassStopped as stopped:
            raise abandon(f"in its log-probs, {stopped}") from None
        if token_level:
            reinforce_pp_advantages(minis, a.kl_in_reward, groups.dp)
        if signal is not None and signal():
            raise abandon("before its update")
        update_start = time.perf_counter()
        snapshot = None  # a stop between optimizer steps puts the state back from it
        if signal is not None and c.checkpoint.stop_in_update and a.ppo_epochs * len(minis) > 1:
            snapshot = UpdateSnapshot.take(self.policy, self.optimizer, self.scheduler)
        self.scheduler.step(1)  # step k of the warm-up runs at lr * k / warmup_steps (k >= 1)
        try:
            metrics, grad_norms, skipped = update_policy(
                self.policy,
                self.optimizer,
                minis,
                self.options,
                groups,
                a.ppo_epochs,
                self.losses,
                stop_requested=None if snapshot is None else signal,
                times=times,
            )
        except PassStopped as stopped:
            assert snapshot is not None  # update_policy looks only when there is one
            snapshot.restore()
            raise abandon(f"in its update, {stopped}") from None
        self.skipped_steps += skipped
        sync_start = time.perf_counter()
        self.step += 1
        last_stage = unwrap(self.policy[-1]).post_process
        step_kl = reduce_metrics(
            metrics, grad_norms, a.ppo_epochs * len(minis), self.layout, last_stage
        )
        if self.layout.pipeline_parallel > 1:
            step_kl["perf/pipeline_bubble"] = pipeline_bubble(times)
        self._update_reference(step_kl["kl/k3"])
        if engine is not None:
            engine.wake()
        sync = self._sync_weights()
        end = time.perf_counter()
        tokens = float(batch.prompt_lengths.sum() + batch.response_lengths.sum())
        out = {
            "reward/mean": float(batch.rewards.mean()),
            "reward/std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
            "response/length_mean": float(batch.response_lengths.float().mean()),
            "response/truncated": float(batch.truncated.float().mean()),
            **step_kl,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "skipped_steps": float(self.skipped_steps),
            "grading_failures": float(self.grader.failures),
            **rollout_metrics,
            "time/logprobs": update_start - logprob_start,
            "time/update": sync_start - update_start,
            "time/sync": sync.seconds,
            "time/step": end - start,
            "throughput/tokens_per_s": tokens / (end - start),  # prompt + response tokens
        }
        if c.eval_interval and self.step % c.eval_interval == 0:
            out["eval/accuracy"] = self.evaluate()
            out.update(self.evaluate_benchmarks())
        return out

    def _update_reference(self, kl: float) -> None:
        a = self.config.algorithm
        self.kl_average = KL_AVERAGE_DECAY * self.kl_average + (1 - KL_AVERAGE_DECAY) * kl
        if self.reference is None:
            return  # kl_anchor 'old': the anchor is pi_old, updated every step by construction
        optimizer_steps = self.step * self.config.optimizer_steps_per_step()
        if reference_update_due(
            optimizer_steps, a.ref_update_interval, self.kl_average, a.ref_update_kl_target
        ):
            self.reference.update_reference(self.policy)
            self.kl_average = 0.0

    # ---------------------------------------------------------------------------- evaluation

    def evaluate(self) -> float:
        """Greedy accuracy on the task's problems (evaluation.greedy_accuracy); collective."""
        max_tokens = self.config.rollout.max_tokens
        return greedy_accuracy(self.task, self.tokenizer, self.engine, self.grade, max_tokens)

    def evaluate_benchmarks(self) -> dict[str, float]:
        """eval_benchmarks with the rollout engine (evaluation.run_benchmarks); collective; rank 0
        grades and returns them ({} elsewhere)."""
        pool = self.grader.pool if self.rank == 0 else None
        return run_benchmarks(self.config, self.engine, self.tokenizer, pool)

    # ---------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state; the models' and the optimizer's are sharded (Checkpointer)."""
        return {
            "step": self.step,
            "data_position": self.data_position,
            "skipped_steps": self.skipped_steps,
            "kl_average": self.kl_average,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.data_position, self.kl_average = state["data_position"], state["kl_average"]
        # the saved param groups carry the saved LR: a changed optimizer.lr applies from here
        for group in self.optimizer.param_groups:
            group["max_lr"] = group["min_lr"] = self.config.optimizer.lr

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.step)

    def _resume(self) -> bool:
        directory = self.checkpointer.resume()
        if self.rank == 0:
            fresh = f"no usable checkpoint in {self.run_dir}; starting fresh"
            found = f"continuing from {directory} (step {self.step})"
            print(f"resume: {found if directory else fresh}", flush=True)
        return directory is not None

    # ---------------------------------------------------------------------------- the run

    def train(self, stop: StopSignals | None = None) -> list[dict[str, float]]:
        """Train to train_steps. On SIGUSR1 or SIGTERM (Slurm's warning before a time limit or
        preemption; slurm/common.sh forwards it), or when the next step and its save would end
        past checkpoint.stop_after_minutes, the ranks agree after the current step (or, on a
        signal, at the next point of train_step that looks, abandoning that step), write a
        checkpoint and return early; the requeued job resumes from it (--resume). At least one
        step runs, so that a requeued job always makes progress."""
        c = self.config
        stop = stop or StopSignals()
        progress = Progress(c.train_steps, "step", enabled=self.rank == 0)
        progress.update(self.step)
        history: list[dict[str, float]] = []
        longest_step = longest_save = 0.0
        saved: Path | None = None  # the checkpoint of this step, when one was written
        while self.step < c.train_steps:
            start = time.monotonic()
            try:
                metrics = self.train_step(stop if history else None)  # the first always runs
            except StepAbandoned as abandoned:
                self._stop(f"a signal (step {self.step + 1} abandoned {abandoned})", saved)
                break
            longest_step = max(longest_step, time.monotonic() - start)
            history.append(metrics)
            if self.log is not None:
                self.log.write(self.step, metrics)
            progress.update(
                1,
                reward=metrics["reward/mean"],
                kl=metrics.get("kl/k3", float("nan")),
                entropy=metrics.get("entropy/mean", float("nan")),
                clip=metrics.get("clip/upper", 0.0) + metrics.get("clip/lower", 0.0),
                len=metrics["response/length_mean"],
                tok_s=metrics["throughput/tokens_per_s"],
            )
            interval = c.checkpoint.save_interval
            saved = None
            if (interval and self.step % interval == 0) or self.step == c.train_steps:
                start = time.monotonic()
                saved = self.save_checkpoint()
                longest_save = max(longest_save, time.monotonic() - start)
            if self.step == c.train_steps:
                break
            reason = stop.check(c.checkpoint.stop_after_minutes, longest_step + longest_save)
            if reason is not None:
                self._stop(reason, saved)
                break
        progress.close()
        if self.log is not None:
            print(self.log.close(), flush=True)
        return history

    def _stop(self, reason: str, saved: Path | None = None) -> None:
        """Checkpoint (unless `saved` already holds this step) and tell the launcher."""
        path = saved or self.save_checkpoint()
        if self.rank == 0:
            print(f"stopping on {reason}: checkpoint {path} (step {self.step})", flush=True)
            mark_stopped_early(self.step, reason)

    def close(self) -> None:
        """Stop the grader pool and the rollout engine (before the process group goes)."""
        self.grader.close()
        if self.engine.engine is not None:
            self.engine.engine.close()
            self.engine.engine = None


def run_training(
    config: RunConfig, resume: bool = False, stop: StopSignals | None = None
) -> list[dict[str, float]]:
    """Build the trainer on this rank (process group initialized) and train; `stop`: the
    rank's signal handlers if they were installed earlier (else installed now, before the
    model is built)."""
    stop = stop or StopSignals()
    trainer = Trainer(config, resume)
    try:
        return trainer.train(stop)
    finally:
        trainer.close()
