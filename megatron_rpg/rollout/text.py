"""Text in, text out over any rollout engine (evaluation): prompts are encoded with the model's
tokenizer (`encode_prompt`: its chat template when on, as in training), k responses sampled per
prompt, decoded.

    generate = TextGenerator(engine, tokenizer, SamplingParams(max_tokens=8192, seed=0))
    responses = generate(["Solve ..."], k=32)          # [[32 strings]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from megatron_rpg.rollout.protocol import Response, SamplingParams


class Generates(Protocol):
    """An engine, or the trainer (whose generate is collective over its ranks)."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]: ...


class TextGenerator:
    def __init__(self, engine: Generates, tokenizer: Any, params: SamplingParams):
        self.engine, self.tokenizer = engine, tokenizer
        stop = (*params.stop_token_ids, tokenizer.eos_id)
        self.params = dataclasses.replace(params, stop_token_ids=stop)

    def __call__(self, prompts: list[str], k: int) -> list[list[str]]:
        encoded = [self.tokenizer.encode_prompt(p) for p in prompts]
        groups = self.engine.generate(encoded, dataclasses.replace(self.params, n=k))
        return [[self.tokenizer.decode(r.token_ids) for r in group] for group in groups]
