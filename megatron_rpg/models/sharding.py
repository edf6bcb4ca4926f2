"""Full (unsharded, TP=1 x PP=1) Megatron state dicts <-> this rank's shards.

The rules come from the parameters themselves: Megatron tags each tensor-parallel parameter with
`tensor_model_parallel` and `partition_dim`. The one layout that is not a plain split is the
SwiGLU `linear_fc1`, whose full weight is [gate; up] and whose TP shard r is
[gate_r; up_r]. Layer indices are local to a pipeline stage; `layer_number` (1-based, global)
names them in the full state dict.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from megatron_rpg.parallel.groups import ProcessGroups

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def is_gated(name: str, model: Any) -> bool:
    return name.endswith(("linear_fc1.weight", "linear_fc1.bias")) and bool(
        model.config.gated_linear_unit
    )


def global_name(model: Any, local_name: str) -> str:
    """'decoder.layers.0.x' on a later pipeline stage -> 'decoder.layers.<global>.x'."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{local_name[match.end() :]}"


def tp_slice(full: Tensor, partition_dim: int, tp_size: int, tp_rank: int, gated: bool) -> Tensor:
    if gated:
        gate, up = full.chunk(2, dim=partition_dim)
        return torch.cat(
            [
                gate.chunk(tp_size, partition_dim)[tp_rank],
                up.chunk(tp_size, partition_dim)[tp_rank],
            ],
            dim=partition_dim,
        )
    return full.chunk(tp_size, dim=partition_dim)[tp_rank]


def tp_join(shards: list[Tensor], partition_dim: int, gated: bool) -> Tensor:
    """Inverse of tp_slice over all TP ranks' shards (in rank order)."""
    if gated:
        halves = [s.chunk(2, dim=partition_dim) for s in shards]
        return torch.cat(
            [
                torch.cat([h[0] for h in halves], partition_dim),
                torch.cat([h[1] for h in halves], partition_dim),
            ],
            dim=partition_dim,
        )
    return torch.cat(shards, dim=partition_dim)


def sharded_parameters(model: Any) -> Iterator[tuple[str, nn.Parameter, int | None, bool]]:
    """(global name, parameter, TP partition dim or None, gated) for each parameter of a chunk."""
    for name, param in model.named_parameters():
        split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        yield global_name(model, name), param, split, is_gated(name, model)


def full_name(model: Any, name: str) -> str:
    """The full state dict holds a tied output layer under the embedding's name."""
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return name


@torch.no_grad()
def load_full_state_dict(
    model: Any,
    full: Mapping[str, Tensor] | Callable[[str], Tensor],
    groups: ProcessGroups | None = None,
) -> None:
    """Copy this rank's shard of every parameter from full tensors (no communication). `full` is
    a state dict or a getter fetching one full tensor at a time (streaming conversion); groups:
    the layout's (omitted: Megatron's current ones), for this rank's TP place."""
    groups = groups or ProcessGroups.current()
    tp_size, tp_rank = groups.tp_size, groups.tp_rank
    get = full.__getitem__ if isinstance(full, Mapping) else full
    for name, param, split, gated in sharded_parameters(model):
        key = full_name(model, name)
        try:
            value = get(key)
        except KeyError as err:
            # a getter's own message names the source tensor (e.g. the HF one); a dict's does not
            source = err.args[0] if err.args and not isinstance(full, Mapping) else None
            what = source or f"state dict has no tensor {key!r}"
            raise KeyError(f"{what} (needed for {name})") from None
        if split is not None:
            value = tp_slice(value, split, tp_size, tp_rank, gated)
        if value.shape != param.shape:
            raise ValueError(
                f"tensor {key!r}: shard shape {tuple(value.shape)} does not fit parameter "
                f"{tuple(param.shape)}"
            )
        param.copy_(value)
