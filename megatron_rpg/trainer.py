"""The RPG trainer: the RL loop of the paper (arXiv 2505.17508) on Megatron-Core. It builds the
components, resumes, and for each step calls the stages of megatron_rpg/step/ in a
StepTransaction, then logs, checkpoints and stops:

    collect (prompts -> rollout/service.py samples and grades -> the step's batch)
      -> advantages -> mini-batches -> old and reference log-probs -> optimizer steps (update)
      -> reference update (step/reference.py) -> weight sync -> periodic evaluation

Every rank runs this. Sampling is seeded by (seed, step) and the data order by (seed, epoch), so
a resumed run repeats the uninterrupted one bit for bit. The checkpoint holds the models, the
optimizer and every Stateful component (`Trainer.components`).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch.distributed as dist

from megatron_rpg import build
from megatron_rpg.checkpoint.mcore import model_files
from megatron_rpg.checkpoint.train_state import Checkpointer, Stateful
from megatron_rpg.config import RunConfig, config_to_dict, config_yaml
from megatron_rpg.data import ArithmeticTask
from megatron_rpg.evaluation import RunEvaluation
from megatron_rpg.forward_backward import LogprobOptions
from megatron_rpg.models import ModelArch
from megatron_rpg.models.builder import unwrap
from megatron_rpg.parallel import initialize_model_parallel
from megatron_rpg.rollout.placement import rollout_placement
from megatron_rpg.rollout.protocol import SamplingParams
from megatron_rpg.rollout.service import RolloutService
from megatron_rpg.run.manifest import record_run_start
from megatron_rpg.run.metrics import MetricsLog, check_logging
from megatron_rpg.run.preemption import StopSignals, mark_stopped_early
from megatron_rpg.run.progress import Progress, step_fields
from megatron_rpg.sft import supervised_warmup
from megatron_rpg.step.collect import CollectSettings
from megatron_rpg.step.counters import RunCounters
from megatron_rpg.step.reference import ReferenceSchedule
from megatron_rpg.step.rl_step import RLStep
from megatron_rpg.step.transaction import StepAbandoned, StepTransaction
from megatron_rpg.step.update import LossSettings, policy_losses


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = c = config
        a = c.algorithm
        check_logging(c.logging)
        self.hf_config = build.model_hf_config(c.model.hf_config)
        self.arch = ModelArch.from_hf(self.hf_config)
        self.layout = initialize_model_parallel(c.parallel, c.seed)
        ranks, dtype = self.layout.world_size, c.model.params_dtype
        placement = rollout_placement(c.rollout, self.arch, ranks, dtype)
        build.check_batch_layout(c.optimizer, self.layout.data_parallel)
        self.rank, self.run_dir = dist.get_rank(), Path(c.logging.run_dir)
        self.task = build.build_task(c.data)
        self.tokenizer = build.build_tokenizer(c, self.task, self.arch.vocab_size, self.run_dir)
        self.policy, reference = build.build_models(
            self.arch, c.model, c.parallel, with_reference=c.loss.kl_anchor == "ref"
        )
        o = c.optimizer
        self.optimizer = build.make_optimizer(self.policy, o, o.lr, o.weight_decay)
        scheduler = build.make_scheduler(self.optimizer, o, c.train_steps)
        self.lr_schedule = build.LRSchedule(scheduler, self.optimizer, o.lr)
        self.reference = ReferenceSchedule(reference, a.ref_update_interval, a.ref_update_kl_target)
        self.rollout = RolloutService.start(
            c.rollout, placement, self.hf_config, self.run_dir, seed=c.seed,
            max_prompt_tokens=c.data.max_prompt_tokens, grader=self.task.grader,
        )  # fmt: skip
        self.options = LogprobOptions(self.arch.vocab_size, temperature=c.rollout.temperature)
        loss = LossSettings(a.loss, c.loss, o.loss_in_forward)
        self.losses = functools.partial(policy_losses, loss)  # per mini-batch (tests wrap it)
        self.counters = RunCounters()
        self.components: dict[str, Stateful] = dict(
            counters=self.counters, lr_schedule=self.lr_schedule, reference_schedule=self.reference
        )
        self.checkpointer = Checkpointer(
            self.run_dir, [unwrap(m) for m in self.policy], self.optimizer,
            reference.chunks if reference is not None else None, self.components,
            c.checkpoint, config_yaml(c), model_files(self.hf_config, self.tokenizer.path),
        )  # fmt: skip
        resumed = resume and self.checkpointer.resume() is not None
        if not resumed and c.sft.steps and not c.model.checkpoint:
            self._supervised_warmup()
        self.log = None
        if self.rank == 0:
            self.log = MetricsLog(c.logging, self.run_dir, self.counters.step, config_to_dict(c))
            inputs = (c.model.hf_config, c.data.train_path)
            record_run_start(
                self.run_dir, config_to_dict(c), config_yaml(c), self.tokenizer.path, inputs
            )
        self.rl_step = RLStep(
            a, o, c.checkpoint.stop_in_update, c.seed, self.arch, self.policy, self.optimizer,
            scheduler, self.reference, self.rollout, self.task, self.tokenizer,
            CollectSettings.of(c.rollout, c.data, a, self.tokenizer.eos_id), self.layout,
            self.options, self.counters,
        )  # fmt: skip
        r = c.rollout
        sampling = SamplingParams(
            temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=c.seed
        )
        self.evaluation = RunEvaluation(
            c.eval_interval, c.eval_benchmarks, c.eval_k, c.eval_limit, sampling, c.data,
            self.task, self.tokenizer,
        )  # fmt: skip
        self.rollout.sync_weights(self.policy, self.arch, self.layout.groups)  # the first weights

    def _supervised_warmup(self) -> None:
        c = self.config
        assert isinstance(self.task, ArithmeticTask)  # RunConfig.validate: sft needs it
        optimizer = build.make_optimizer(self.policy, c.optimizer, c.sft.lr, weight_decay=0.0)
        supervised_warmup(
            c.sft, self.policy, optimizer, self.task, self.tokenizer, self.layout,
            self.arch.vocab_size, c.seed, self.rank == 0,
        )  # fmt: skip
        self.reference.restart_from(self.policy)  # regularize toward the warmed-up model

    def train_step(self, stop: StopSignals | None = None) -> dict[str, float]:
        """One RL step (step/rl_step.py), in a StepTransaction with `stop`; then the periodic
        evaluation."""
        metrics = self.rl_step.run(StepTransaction(stop, self.counters), self.losses)
        if self.evaluation.due(self.counters.step):
            metrics.update(self.evaluation(self.rollout))
        return metrics

    def train(self, stop: StopSignals | None = None) -> list[dict[str, float]]:
        """Train to train_steps. On SIGUSR1 or SIGTERM (Slurm's warning before a time limit or
        preemption; slurm/common.sh forwards it), or when the next step and its save would end
        past checkpoint.stop_after_minutes, the ranks agree after the current step (or, on a
        signal, at the next point of the step that looks, abandoning that step), write a
        checkpoint and return early; the requeued job resumes from it (--resume). At least one
        step runs, so that a requeued job always makes progress."""
        c, counters = self.config, self.counters
        stop = stop or StopSignals()
        progress = Progress(c.train_steps, "step", enabled=self.rank == 0)
        progress.update(counters.step)
        history: list[dict[str, float]] = []
        longest_step = longest_save = 0.0
        saved: Path | None = None  # the checkpoint of this step, when one was written
        while counters.step < c.train_steps:
            start = time.monotonic()
            try:
                metrics = self.train_step(stop if history else None)  # the first always runs
            except StepAbandoned as abandoned:
                self._stop(f"a signal (step {counters.step + 1} abandoned {abandoned})", saved)
                break
            longest_step = max(longest_step, time.monotonic() - start)
            history.append(metrics)
            if self.log is not None:
                self.log.write(counters.step, metrics)
            progress.update(1, **step_fields(metrics))
            interval, saved = c.checkpoint.save_interval, None
            if (interval and counters.step % interval == 0) or counters.step == c.train_steps:
                start = time.monotonic()
                saved = self.checkpointer.save(counters.step)
                longest_save = max(longest_save, time.monotonic() - start)
            if counters.step == c.train_steps:
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
        path = saved or self.checkpointer.save(self.counters.step)
        if self.rank == 0:
            step = self.counters.step
            print(f"stopping on {reason}: checkpoint {path} (step {step})", flush=True)
            mark_stopped_early(self.counters.step, reason)

    def close(self) -> None:
        """Stop the grader pool and the rollout engine (before the process group goes)."""
        self.rollout.close()


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
