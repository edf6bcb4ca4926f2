"""Rollout engines: generation plus live weight sync from the trainer (see protocol.py).

EmbeddedEngine (transformers, CPU default) is importable everywhere; the vLLM engines live in
megatron_rpg.rollout.vllm_engine and import vLLM only when built.
"""

from megatron_rpg.rollout.embedded import EmbeddedEngine
from megatron_rpg.rollout.protocol import Response, RolloutEngine, SamplingParams, check_prompts
from megatron_rpg.rollout.sync import SyncStats, sync_weights

__all__ = [
    "EmbeddedEngine",
    "Response",
    "RolloutEngine",
    "SamplingParams",
    "SyncStats",
    "check_prompts",
    "sync_weights",
]
