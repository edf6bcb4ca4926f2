"""What every rollout engine offers the trainer (embedded on CPU, vLLM on GPUs).

    engine.generate(prompts, SamplingParams(n=8, max_tokens=256, seed=1))  -> list[list[Response]]
    engine.update_weights(iter_hf_weights(chunks, arch, layout=engine.weight_layout(groups)))
    engine.sleep(); ...train...; engine.wake()                             # colocated memory

Log-probs are those of the distribution the token was sampled from: log_softmax(logits / T) in
fp32, renormalized over the tokens top-k / top-p keep (vLLM's `processed_logprobs`). With
top_k=0 and top_p=1 this is exactly what the trainer computes at the same temperature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from megatron_rpg.config import ConfigError
from megatron_rpg.parallel.groups import ProcessGroups

FINISH_REASONS = ("stop", "length")


class EngineError(RuntimeError):
    """The rollout engine failed (a dead server, a refused request); names the engine."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("n", self.n, self.n >= 1, ">= 1"),
            ("temperature", self.temperature, 0 < self.temperature <= 10, "in (0, 10]"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)"),
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, ">= 1"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"sampling.{key}", value, allowed)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Response:
    token_ids: list[int]  # includes the stop token when one ended the response
    logprobs: list[float]  # one per token, see the module docstring
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or the context)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        """`params.n` responses for each prompt, in prompt order."""
        ...

    def weight_layout(self, groups: ProcessGroups) -> str:
        """The layout of the export stream it takes from a trainer with `groups`
        (models/export.py: full, tp_shards or own_shards); the same answer on every rank."""
        ...

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Load the export stream's HF-named tensors; returns the bytes this rank handed over."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None:
        """Release the engine (before the trainer's process group is destroyed)."""
        ...

    # True: generate and update_weights are collective over the trainer's ranks (a colocated
    # vLLM engine in every rank); False: generate runs on the rank holding the engine
    collective: bool


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_len: int) -> None:
    """Refuse empty, out-of-vocabulary or over-long prompts, naming the prompt."""
    if not prompts:
        raise ValueError("generate: no prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(prompt) >= max_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; the engine's context is {max_len} tokens "
                "and at least one must remain for the response"
            )
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
