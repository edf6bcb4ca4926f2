"""The frozen reference policy pi_ref, laid out like the policy (same TP/PP shards on each rank).

`update_reference()` is the iterative reference update of spec section 6: pi_ref <- pi_theta, a
shard-local copy with no communication.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_rpg.models.builder import unwrap


class ReferenceModel:
    def __init__(self, chunks: list[nn.Module], policy_chunks: list[nn.Module]):
        if len(chunks) != len(policy_chunks):
            raise ValueError(f"reference has {len(chunks)} chunks, policy has {len(policy_chunks)}")
        self.chunks = chunks
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self.update_reference(policy_chunks)

    @torch.no_grad()
    def update_reference(self, policy_chunks: list[nn.Module]) -> None:
        """Copy the policy's weights shard by shard. With the distributed optimizer's overlapped
        param gather, call `start_param_sync(force_sync=True)` on the policy first."""
        for ref, policy in zip(self.chunks, policy_chunks, strict=True):
            ref_params = dict(ref.named_parameters())
            policy_params = dict(unwrap(policy).named_parameters())
            if ref_params.keys() != policy_params.keys():
                raise ValueError("reference and policy chunks do not have the same parameters")
            for name, param in ref_params.items():
                param.copy_(policy_params[name])
