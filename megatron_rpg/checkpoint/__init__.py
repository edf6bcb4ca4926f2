"""Checkpoints: Hugging Face safetensors directories (read lazily, written atomically)."""

from megatron_rpg.checkpoint.hf import HFCheckpoint, write_hf_checkpoint

__all__ = ["HFCheckpoint", "write_hf_checkpoint"]
