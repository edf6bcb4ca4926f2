"""The rollout side as the trainer sees it, whatever the placement (rollout/placement.py): one
object, collective on every rank.

    rollout = RolloutService.start(config.rollout, placement, hf_config, run_dir, seed=...,
                                   max_prompt_tokens=..., grader=task.grader)
    groups = rollout.generate(prompts, params)      # the same response groups on every rank
    scores = rollout.grade([(text, answer), ...])   # rank 0 grades, every rank gets the scores
    rollout.sleep(); ...update...; rollout.wake()   # a colocated engine frees its memory
    stats = rollout.sync_weights(policy, arch, groups)
    rollout.close()

The engine lives on the ranks the placement gives it (rank 0 for the embedded engine and a
vLLM server's client, every rank for colocated vLLM); nothing outside rollout/ touches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpg.config import RolloutConfig
from megatron_rpg.models import ModelArch
from megatron_rpg.parallel.groups import ProcessGroups
from megatron_rpg.rewards.grader import TaskGrader
from megatron_rpg.rewards.sandbox import GraderPool
from megatron_rpg.rollout.build import build_engine, engine_max_model_len
from megatron_rpg.rollout.collective import collective_generate, on_rank0
from megatron_rpg.rollout.placement import RolloutPlacement
from megatron_rpg.rollout.protocol import Response, RolloutEngine, SamplingParams
from megatron_rpg.rollout.sync import SyncStats, sync_weights


class RolloutService:
    def __init__(
        self,
        engine: RolloutEngine | None,
        grader: TaskGrader,
        rank: int,
        bucket_bytes: int = 512 * 2**20,
    ):
        self._engine, self._grader, self.rank = engine, grader, rank
        self.bucket_bytes = bucket_bytes  # the weight sync's (rollout.sync_bucket_mb)

    @classmethod
    def start(
        cls,
        rollout: RolloutConfig,
        placement: RolloutPlacement,
        hf_config: dict[str, Any],
        run_dir: Path,
        *,
        seed: int,
        max_prompt_tokens: int,
        grader: str,
    ) -> RolloutService:
        """Build this rank's engine (if the placement puts one here; sequences of up to
        `max_prompt_tokens` + rollout.max_tokens) and the grader (`grader`: the task's kind,
        rewards/grader.py; its sandboxed pool starts on first use)."""
        rank = dist.get_rank()
        longest = engine_max_model_len(max_prompt_tokens, rollout.max_tokens, hf_config)
        engine = build_engine(rollout, placement, hf_config, run_dir, rank, seed, longest)
        return cls(engine, TaskGrader(grader), rank, rollout.sync_bucket_mb * 2**20)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        """Collective: n responses per prompt, the same on every rank."""
        return collective_generate(self._engine, self.rank, prompts, params)

    def grade(self, items: list[tuple[str, Any]]) -> list[float]:
        """Collective: rank 0 grades (response text, reference) pairs, every rank gets the
        scores."""
        return on_rank0(lambda: self._grader(items))

    @property
    def grader_pool(self) -> GraderPool | None:
        """Rank 0's sandboxed grader pool, for benchmarks graded beside the task (None
        elsewhere)."""
        return self._grader.pool if self.rank == 0 else None

    def sync_weights(self, chunks: list[Any], arch: ModelArch, groups: ProcessGroups) -> SyncStats:
        """Collective: the policy's export stream into every engine of the placement."""
        return sync_weights(chunks, arch, self._engine, self.bucket_bytes, groups)

    def sleep(self) -> None:
        """A colocated engine frees its memory for the update (the others keep theirs)."""
        if self._engine is not None:
            self._engine.sleep()

    def wake(self) -> None:
        if self._engine is not None:
            self._engine.wake()

    def stats(self) -> dict[str, float]:
        """Counters of the rollout side, for the step's metrics."""
        return {"grading_failures": float(self._grader.failures)}

    def close(self) -> None:
        """Stop the grader pool and the engine (before the process group goes)."""
        self._grader.close()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
