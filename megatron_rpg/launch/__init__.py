"""Launching on clusters: the layout and memory plan checked before submission."""

from megatron_rpg.launch.plan import MemoryPlan, memory_plan

__all__ = ["MemoryPlan", "memory_plan"]
