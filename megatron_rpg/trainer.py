"""The RPG trainer: the RL loop of the paper (arXiv 2505.17508) on Megatron-Core.

One step:

    prompts --engine--> n responses each --grader--> rewards --> advantages (per group)
      --> old log-probs (one forward, skipped when a single on-policy update makes pi_old the
          current policy) and reference log-probs (kl_anchor='ref')
      --> for each of ppo_epochs, mini-batch updates of the configured loss (losses/)
      --> iterative reference update (every K steps, or when the moving-average KL > target)
      --> weight sync into the engine --> periodic greedy evaluation --> checkpoint

Every rank runs this. The rollout engine (rollout/placement.py) is the embedded one or a vLLM
server, driven by rank 0, which broadcasts what it returns, or vLLM colocated in every rank, each
engine sampling its share of the prompts; rank 0 grades.
Sequences are split over data-parallel ranks inside each mini-batch, and the loss of every
micro-batch is its share of the mini-batch's loss (global token / sequence counts), so the update
does not depend on the layout. A step whose gradients are not finite on any rank is skipped
(no optimizer step) and counted. Sampling is seeded by (seed, step) and the data order by
(seed, epoch), so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from megatron_rpg.checkpoint import train_state
from megatron_rpg.checkpoint.mcore import load_mcore, model_files
from megatron_rpg.config import ConfigError, RunConfig, config_to_dict, config_yaml, save_config
from megatron_rpg.data import ArithmeticTask, MathDataset, Task, build_task
from megatron_rpg.forward_backward import LogprobOptions, forward_backward
from megatron_rpg.losses import compute_advantages, policy_loss
from megatron_rpg.losses.advantages import reinforce_pp_returns, whiten
from megatron_rpg.losses.aggregation import masked_mean
from megatron_rpg.manifest import write_manifest
from megatron_rpg.metrics import MetricsLog, check_logging
from megatron_rpg.models import ModelArch, ReferenceModel, build_model_chunks
from megatron_rpg.models.arch import read_hf_config
from megatron_rpg.models.builder import resolve_dtype, unwrap
from megatron_rpg.parallel import every_core, initialize_model_parallel
from megatron_rpg.progress import Progress
from megatron_rpg.rewards import exact_match
from megatron_rpg.rewards.sandbox import GraderPool
from megatron_rpg.rl_batch import RolloutBatch, build_batch, length_bucketed
from megatron_rpg.rollout import Response, SamplingParams, sync_weights
from megatron_rpg.rollout.build import build_engine
from megatron_rpg.rollout.collect import CollectSettings, collect_groups
from megatron_rpg.rollout.placement import rollout_placement
from megatron_rpg.rollout.protocol import EngineError
from megatron_rpg.sft import supervised_warmup
from megatron_rpg.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

Batch = dict[str, torch.Tensor]
KL_AVERAGE_DECAY = 0.9  # moving average of the step KL for the reference update trigger
EVAL_PROBLEMS = 256  # the greedy evaluation (eval_interval) reads the task's first 256 problems


def model_hf_config(path: str) -> dict[str, Any]:
    """model.hf_config's config.json, or a one-line error naming the key."""
    allowed = "a config.json file or a directory holding one"
    if not path:
        raise ConfigError("model.hf_config", path, allowed)
    try:
        return read_hf_config(path)
    except FileNotFoundError:
        raise ConfigError("model.hf_config", path, allowed) from None


def check_before_ranks(config: RunConfig, world_size: int) -> None:
    """What a launcher checks before it starts `world_size` ranks: the model's config and where
    the rollout engine runs (ConfigError naming the key)."""
    arch = ModelArch.from_hf(model_hf_config(config.model.hf_config))
    rollout_placement(config.rollout, arch, world_size)


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
        self.hf_config = hf_config = model_hf_config(c.model.hf_config)
        self.arch = ModelArch.from_hf(hf_config)
        self.layout = initialize_model_parallel(c.parallel, c.seed)
        self.placement = rollout_placement(c.rollout, self.arch, self.layout.world_size)
        micro, dp = c.optimizer.micro_batch_size, self.layout.data_parallel
        if c.optimizer.mini_batch_size % (micro * dp):
            raise ConfigError(
                "optimizer.mini_batch_size",
                c.optimizer.mini_batch_size,
                f"a multiple of micro_batch_size x data-parallel ranks ({micro} x {dp})",
            )
        self.rank = dist.get_rank()
        self.run_dir = Path(c.logging.run_dir)
        self.task: Task = build_task(c.data)
        self.tokenizer = self._tokenizer()
        if self.tokenizer.vocab_size > self.arch.vocab_size:
            raise ConfigError(
                "model.tokenizer",
                str(self.tokenizer.path),
                f"a tokenizer of at most the model's vocab_size "
                f"({self.arch.vocab_size}); it has {self.tokenizer.vocab_size}",
            )
        dtype = resolve_dtype(c.model.params_dtype)
        chunks = build_model_chunks(self.arch, c.parallel, dtype)
        if c.model.checkpoint:
            load_mcore(chunks, c.model.checkpoint)
        self.policy = _wrap_ddp(chunks)
        self.optimizer = self.make_optimizer(c.optimizer.lr, c.optimizer.weight_decay)
        self.scheduler = self._scheduler()
        self.reference = None
        if c.loss.kl_anchor == "ref":
            ref_chunks = build_model_chunks(self.arch, c.parallel, dtype)
            self.reference = ReferenceModel(ref_chunks, self.policy)
        # every rank holding an engine receives the weights; generation: see generate()
        self.engine = build_engine(c, self.placement, hf_config, self.run_dir, self.rank)
        self.options = LogprobOptions(self.arch.vocab_size, temperature=c.rollout.temperature)
        self.step, self.skipped_steps, self.kl_average = 0, 0, 0.0
        self.data_position = 0  # prompts consumed so far (more than steps x prompts with DAPO)
        self.grader_pool: GraderPool | None = None
        self.grading_failures = 0  # graded 0 after a timeout, crash or grader error
        resumed = self._resume() if resume else False
        if not resumed and c.sft.steps and not c.model.checkpoint:
            assert isinstance(self.task, ArithmeticTask)  # RunConfig.validate: sft needs it
            optimizer = self.make_optimizer(c.sft.lr, weight_decay=0.0)
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
        self.log = None
        if self.rank == 0:
            self.log = MetricsLog(c.logging, self.run_dir, self.step, config_to_dict(c))
            save_config(c, self.run_dir / "config.yaml")
            paths = [Path(p) for p in (c.model.hf_config, c.data.train_path) if p]
            paths = [p / "config.json" if p.is_dir() else p for p in paths]
            write_manifest(
                self.run_dir / "manifest.json", config_to_dict(c), [self.tokenizer.path, *paths]
            )
        sync_weights(self.policy, self.arch, self.engine)  # the engine starts from the policy

    # ---------------------------------------------------------------------------- building

    def _tokenizer(self) -> Any:
        """model.tokenizer (a directory or a tokenizer.model), else the tokenizer files of
        model.checkpoint; the arithmetic task trains its own into the run directory."""
        c = self.config
        chat = c.data.chat_template
        if c.model.tokenizer:
            path = Path(c.model.tokenizer)
            return load_tokenizer(path, chat) if path.is_dir() else Tokenizer(path, chat)
        if c.model.checkpoint and isinstance(self.task, MathDataset):
            return load_tokenizer(c.model.checkpoint, chat)
        if not isinstance(self.task, ArithmeticTask):
            raise ConfigError(
                "model.tokenizer",
                "",
                "a tokenizer directory or tokenizer.model "
                "(or model.checkpoint with tokenizer files) for data.task=math",
            )
        path = self.run_dir / "tokenizer.model"
        if self.rank == 0 and not path.is_file():
            # digits and operators are single pieces (numbers spelled digit by digit); "=" is
            # left to the unigram model, which needs at least one ordinary character
            symbols = list("0123456789" + c.data.operators)
            train_sentencepiece(self.task.corpus(), path, self.arch.vocab_size, symbols)
        dist.barrier()
        return Tokenizer(path, chat)

    def grade(self, items: list[tuple[str, str]]) -> list[float]:
        """Rewards of (response text, reference) pairs: exact match in this process (the
        arithmetic task), math-verify in the sandboxed pool (math). Rank 0."""
        if self.task.grader == "exact":
            return [exact_match(text, answer) for text, answer in items]
        if self.grader_pool is None:
            self.grader_pool = GraderPool()
        scores, stats = self.grader_pool.grade(self.task.grader, items)
        self.grading_failures += stats["timeouts"] + stats["crashes"] + stats["errors"]
        return scores

    def make_optimizer(self, lr: float, weight_decay: float) -> Any:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o = self.config.optimizer
        dtype = self.policy[0].config.params_dtype
        return get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=lr,
                weight_decay=weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=dtype == torch.bfloat16,
                fp16=False,
                params_dtype=dtype,
                use_distributed_optimizer=torch.cuda.is_available(),
            ),
            self.policy,
        )

    def _scheduler(self) -> Any:
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o, steps = self.config.optimizer, self.config.train_steps
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(steps, o.warmup_steps + 1),
            lr_decay_style="constant",
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(steps, 1),
            wd_incr_style="constant",
            override_opt_param_scheduler=True,  # on resume the config's values apply
            use_checkpoint_opt_param_scheduler=False,
        )

    # ---------------------------------------------------------------------------- rollout

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        """Collective: every rank gets the responses. A colocated vLLM engine generates on
        every rank; the embedded engine and a vLLM server on rank 0, which broadcasts (and
        broadcasts a failure, so that no rank waits in a collective for an answer that will
        not come)."""
        if self.engine is not None and self.engine.collective:
            groups: list[list[Response]] = self.engine.generate(prompts, params)
            return groups
        payload: list[Any] = [None]
        failure: Exception | None = None
        if self.rank == 0:
            try:
                with every_core():  # the other ranks wait in the broadcast below
                    payload = [(cast(Any, self.engine).generate(prompts, params), None)]
            except Exception as err:
                failure, payload = err, [(None, f"{type(err).__name__}: {err}")]
        dist.broadcast_object_list(payload, src=0)
        groups, error = payload[0]
        if failure is not None:
            raise failure
        if error is not None:
            raise EngineError(f"rank 0's rollout engine failed: {error}")
        return cast(list[list[Response]], groups)

    def grade_everywhere(self, items: list[tuple[str, Any]]) -> list[float]:
        """Collective: rank 0 grades, every rank gets the scores."""
        payload: list[Any] = [self.grade(items) if self.rank == 0 else None]
        dist.broadcast_object_list(payload, src=0)
        return cast(list[float], payload[0])

    def _rollout(self) -> tuple[RolloutBatch, dict[str, float]]:
        """Every rank in lockstep: sample and grade the step's groups (rollout/collect.py)."""
        c, a = self.config, self.config.algorithm
        start = time.perf_counter()
        settings = CollectSettings(
            prompts=c.data.prompts_per_step,
            params=SamplingParams(
                n=c.rollout.n,
                temperature=c.rollout.temperature,
                top_p=c.rollout.top_p,
                top_k=c.rollout.top_k,
                max_tokens=c.rollout.max_tokens,
                stop_token_ids=(self.tokenizer.eos_id,),
            ),
            dynamic_sampling=a.dynamic_sampling,
            max_rounds=a.dynamic_sampling_max_rounds,
            overlong_buffer=a.overlong_buffer,
            overlong_penalty=a.overlong_penalty,
            incorrect_reward=a.incorrect_reward,
            max_prompt_tokens=c.data.max_prompt_tokens,
        )
        groups, metrics, self.data_position = collect_groups(
            self.task,
            self.tokenizer,
            self.generate,
            self.grade_everywhere,
            settings,
            seed=c.seed,
            step=self.step,
            position=self.data_position,
        )
        batch = build_batch(
            [g.prompt for g in groups],
            [g.responses for g in groups],
            [g.rewards for g in groups],
            self.tokenizer.pad_id,
        )
        fillers = torch.tensor([g.filler for g in groups for _ in g.responses])
        batch.response_mask[fillers] = False  # no part in the loss or its token mean
        metrics["time/rollout"] = time.perf_counter() - start
        return batch, metrics

    def evaluate(self) -> float:
        """Greedy accuracy over the task's problems (the first EVAL_PROBLEMS); collective;
        rank 0 grades and returns it, the others nan."""
        problems = self.task.problems[:EVAL_PROBLEMS]
        prompts = [self.tokenizer.encode_prompt(self.task.prompt(p)) for p in problems]
        params = SamplingParams(
            top_k=1,
            max_tokens=self.config.rollout.max_tokens,
            stop_token_ids=(self.tokenizer.eos_id,),
            seed=0,
        )
        groups = self.generate(prompts, params)
        if self.rank != 0:
            return float("nan")
        scores = self.grade(
            [
                (self.tokenizer.decode(g[0].token_ids), self.task.answer(p))
                for p, g in zip(problems, groups, strict=True)
            ]
        )
        return sum(scores) / len(scores)

    def evaluate_benchmarks(self) -> dict[str, float]:
        """mean@k, pass@k and maj@k of `eval_benchmarks` with the rollout engine; collective;
        rank 0 grades and returns them."""
        c = self.config
        names = [n for n in c.eval_benchmarks.split(",") if n]
        if not names:
            return {}
        from megatron_rpg.data import PROMPT_TEMPLATES
        from megatron_rpg.evaluation import benchmark_name, load_benchmark, score_benchmark
        from megatron_rpg.rollout.text import TextGenerator

        params = SamplingParams(
            temperature=c.rollout.temperature,
            top_p=c.rollout.top_p,
            max_tokens=c.rollout.max_tokens,
            seed=c.seed,
        )
        generate = TextGenerator(self, self.tokenizer, params)  # self.generate: collective
        k, out = c.eval_k, {}
        for name in names:
            problems = load_benchmark(name)[: c.eval_limit or None]
            template = PROMPT_TEMPLATES[c.data.prompt_template]
            texts = generate([template.format(problem=p["problem"]) for p in problems], k)
            if self.rank != 0:
                continue
            if self.grader_pool is None:
                self.grader_pool = GraderPool()
            result = score_benchmark(problems, texts, k, self.grader_pool, c.data.answer_extraction)
            for metric in ("mean", "pass", "maj"):
                key = f"eval/{benchmark_name(name)}/{metric}@{k}"
                out[key] = result[f"{metric}@{k}"]
                out[f"{key}_low"], out[f"{key}_high"] = result[f"{metric}@{k}_ci95"]
        return out

    # ---------------------------------------------------------------------------- update

    def _micro_batches(self, batch: RolloutBatch, advantages: torch.Tensor) -> list[list[Batch]]:
        """This rank's micro-batches, per mini-batch, length-bucketed (rl_batch.length_bucketed)
        and each trimmed to its longest sequence; the loss is a sum over tokens with the
        mini-batch's counts, so the grouping leaves it unchanged."""
        o, layout = self.config.optimizer, self.layout
        device = next(self.policy[0].parameters()).device
        lengths = batch.lengths()
        minis = []
        for start in range(0, len(batch), o.mini_batch_size):
            micros = []
            for rows in length_bucketed(
                lengths[start : start + o.mini_batch_size],
                o.micro_batch_size,
                layout.dp_rank,
                layout.data_parallel,
            ):
                index = start + rows
                micro = batch.rows(index)
                micro["advantages"] = advantages[index]
                micros.append({k: v.to(device) for k, v in micro.items()})
            minis.append(micros)
        return minis

    def _attach_logprobs(self, chunks: list[Any], micros: list[Batch], key: str) -> None:
        """Forward only: each micro-batch gets its log-probs under `chunks` (last stage)."""
        for micro, out in zip(micros, forward_backward(chunks, micros, self.options), strict=False):
            micro[key] = out["logprobs"]

    def _reinforce_pp_advantages(self, micros: list[Batch]) -> None:
        """REINFORCE++ token advantages on the last stage: returns with the KL to the reference
        (pi_old when kl_anchor=old) in the reward, whitened over the whole step: every
        micro-batch of every data-parallel rank (losses/advantages.py)."""
        from megatron.core import parallel_state

        if not micros or "old_logprobs" not in micros[0]:
            return  # not the last pipeline stage: the loss is not computed here
        returns = torch.cat(
            [
                reinforce_pp_returns(
                    m["advantages"],
                    m["response_mask"],
                    m["old_logprobs"],
                    m.get("ref_logprobs", m["old_logprobs"]),
                    self.config.algorithm.kl_in_reward,
                ).reshape(-1)
                for m in micros
            ]
        )  # flattened: the micro-batches differ in width
        masks = torch.cat([m["response_mask"].reshape(-1) for m in micros])
        whitened = whiten(returns, masks, parallel_state.get_data_parallel_group()).split(
            [m["response_mask"].numel() for m in micros]
        )
        for micro, advantages in zip(micros, whitened, strict=True):
            micro["advantages"] = advantages.reshape(micro["response_mask"].shape)

    def loss_fn(self, counts: tuple[float, float]) -> Any:
        """The micro-batch loss share: the configured loss with the mini-batch's global counts."""
        c = self.config

        def loss(lp: torch.Tensor, entropy: torch.Tensor, micro: Batch) -> tuple[Any, Any]:
            mask = micro["response_mask"]
            old = micro.get("old_logprobs", lp.detach())
            value, metrics = policy_loss(
                c.algorithm.loss,
                lp,
                old,
                micro["advantages"],
                mask,
                micro.get("ref_logprobs"),
                micro["rollout_logprobs"],
                c.loss,
                num_tokens=counts[0],
                num_sequences=counts[1],
            )
            metrics["entropy/mean"] = masked_mean(entropy.detach(), mask)
            metrics["loss_share"] = value.detach()
            return value, metrics

        return loss

    def _grads_finite(self) -> bool:
        bad = torch.zeros(1)
        for chunk in self.policy:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", param.grad)
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    bad.fill_(1.0)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def _update(self, minis: list[list[Batch]]) -> tuple[list[dict[str, Any]], list[float]]:
        c = self.config
        metrics, grad_norms = [], []
        self.scheduler.step(1)  # step k of the warm-up runs at lr * k / warmup_steps (k >= 1)
        for _ in range(c.algorithm.ppo_epochs):
            for index, micros in enumerate(minis):
                counts = self._mini_counts[index]
                for chunk in self.policy:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                out = forward_backward(self.policy, micros, self.options, self.loss_fn(counts))
                metrics.extend(out)
                if not self._grads_finite():
                    self.skipped_steps += 1
                    continue
                _, grad_norm, _ = self.optimizer.step()
                grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        return metrics, grad_norms

    # ---------------------------------------------------------------------------- one step

    def train_step(self) -> dict[str, float]:
        c = self.config
        start = time.perf_counter()
        batch, rollout_metrics = self._rollout()
        if self.engine is not None:
            self.engine.sleep()  # a colocated engine frees its memory for training
        token_level = c.algorithm.advantage == "reinforce_pp"  # needs log-probs: set below
        advantages = batch.rewards
        if not token_level:
            advantages = compute_advantages(
                c.algorithm.advantage,
                batch.rewards,
                batch.group_ids,
                response_mask=batch.response_mask,
            )
        minis = self._micro_batches(batch, advantages)
        self._mini_counts = []
        for start_row in range(0, len(batch), c.optimizer.mini_batch_size):
            rows = slice(start_row, start_row + c.optimizer.mini_batch_size)
            self._mini_counts.append(
                (float(batch.response_mask[rows].sum()), float(c.optimizer.mini_batch_size))
            )
        logprob_start = time.perf_counter()
        on_policy = c.algorithm.ppo_epochs == 1 and len(minis) == 1 and not token_level
        for micros in minis:
            if not on_policy:
                self._attach_logprobs(self.policy, micros, "old_logprobs")
            if self.reference is not None:
                self._attach_logprobs(self.reference.chunks, micros, "ref_logprobs")
        if token_level:
            self._reinforce_pp_advantages([m for micros in minis for m in micros])
        update_start = time.perf_counter()
        metrics, grad_norms = self._update(minis)
        sync_start = time.perf_counter()
        self.step += 1
        step_kl = self._reduce(metrics, grad_norms)
        self._update_reference(step_kl["kl/k3"])
        if self.engine is not None:
            self.engine.wake()
        sync = sync_weights(self.policy, self.arch, self.engine)
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
            "grading_failures": float(self.grading_failures),
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

    def _reduce(self, metrics: list[dict[str, Any]], grad_norms: list[float]) -> dict[str, float]:
        """Average the last stage's micro-batch metrics over micro-batches and DP ranks; the loss
        is the mean over updates of the summed shares. Collective; the same dict on every rank."""
        local = [{k: float(v) for k, v in m.items()} for m in metrics]
        if not (self.layout.tp_rank == 0 and unwrap(self.policy[-1]).post_process):
            local = []
        gathered: list[Any] = [None] * self.layout.world_size
        dist.all_gather_object(gathered, local)
        everything = [m for part in gathered for m in part]
        updates = self.config.algorithm.ppo_epochs * len(self._mini_counts)
        keys = sorted({k for m in everything for k in m} - {"loss_share", "tokens"})
        out = {k: sum(m[k] for m in everything) / len(everything) for k in keys}
        out["loss"] = sum(m["loss_share"] for m in everything) / updates
        out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
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

    # ---------------------------------------------------------------------------- checkpoints

    def _sharded_state(self, is_loading: bool) -> dict[str, Any]:
        ref = self.reference.chunks if self.reference is not None else None
        chunks = [unwrap(m) for m in self.policy]
        return train_state.sharded_state(chunks, self.optimizer, ref, is_loading)

    def save_checkpoint(self) -> Path:
        c = self.config
        state = {
            "step": self.step,
            "data_position": self.data_position,
            "skipped_steps": self.skipped_steps,
            "kl_average": self.kl_average,
            "scheduler": self.scheduler.state_dict(),
        }
        return train_state.save_train_checkpoint(
            self.run_dir,
            self.step,
            self._sharded_state(False),
            state,
            config_yaml(c),
            c.checkpoint.keep_last,
            c.checkpoint.verify_checksums,
            model_files(self.hf_config, self.tokenizer.path),
        )

    def _resume(self) -> bool:
        directory = train_state.latest_valid(self.run_dir)
        if directory is None:
            if self.rank == 0:
                print(f"resume: no usable checkpoint in {self.run_dir}; starting fresh", flush=True)
            return False
        loaded, state = train_state.load_train_checkpoint(directory, self._sharded_state(True))
        for i, chunk in enumerate(self.policy):
            unwrap(chunk).load_state_dict(loaded["model" if len(self.policy) == 1 else f"model{i}"])
        if self.reference is not None:
            for i, chunk in enumerate(self.reference.chunks):
                key = "reference" if len(self.policy) == 1 else f"reference{i}"
                chunk.load_state_dict(
                    {k.removeprefix("reference."): v for k, v in loaded[key].items()}
                )
        self.optimizer.load_state_dict(loaded["optimizer"])
        # the saved param groups carry the saved LR: a changed optimizer.lr applies from here
        for group in self.optimizer.param_groups:
            group["max_lr"] = group["min_lr"] = self.config.optimizer.lr
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.data_position = state["data_position"]
        self.kl_average = state["kl_average"]
        if self.rank == 0:
            print(f"resume: continuing from {directory} (step {self.step})", flush=True)
        return True

    # ---------------------------------------------------------------------------- the run

    def _stop_requested(self) -> bool:
        """Whether any rank received SIGUSR1/SIGTERM (preemption, a time limit); collective."""
        flag = torch.tensor([1.0 if self._signalled else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def train(self) -> list[dict[str, float]]:
        """Train to train_steps. On SIGUSR1 or SIGTERM (Slurm's warning before a time limit or
        preemption; slurm/common.sh forwards it) the ranks agree after the current step, write a
        checkpoint and return early; the requeued job resumes from it (--resume)."""
        c = self.config
        self._signalled = False
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(signum, self._on_signal)
        progress = Progress(c.train_steps, "step", enabled=self.rank == 0)
        progress.update(self.step)
        history = []
        while self.step < c.train_steps:
            metrics = self.train_step()
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
                saved = self.save_checkpoint()
            if self.step < c.train_steps and self._stop_requested():
                path = saved or self.save_checkpoint()
                if self.rank == 0:
                    print(f"stopping on a signal: checkpoint {path} (step {self.step})", flush=True)
                break
        progress.close()
        if self.log is not None:
            print(self.log.close(), flush=True)
        return history

    def close(self) -> None:
        """Stop the grader pool and the rollout engine (before the process group goes)."""
        if self.grader_pool is not None:
            self.grader_pool.close()
            self.grader_pool = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _wrap_ddp(chunks: list[Any]) -> list[Any]:
    """Megatron DDP around each chunk, with finalize_model_grads wired in (without it data-
    parallel replicas silently diverge: ../shared/docs/megatron_cpu.md)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=torch.cuda.is_available()
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def run_training(config: RunConfig, resume: bool = False) -> list[dict[str, float]]:
    """Build the trainer on this rank (process group initialized) and train."""
    trainer = Trainer(config, resume)
    try:
        return trainer.train()
    finally:
        trainer.close()
