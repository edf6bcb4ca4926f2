"""Megatron's pipeline schedule over micro-batches, producing per-token log-probs and entropies
on the last pipeline stage, either returned (forward only) or fed to a loss (training).

A micro-batch is a dict with "tokens" [b, s] (prompt + response, right-padded) plus whatever the
loss reads. Micro-batches may differ in shape (length-bucketed: each only as wide as its longest
sequence): one schedule runs them all (with pipeline parallelism the stages exchange each
activation's shape first), and the gradient finalization (data-parallel all-reduce, tied
embeddings across stages) runs once, after the last. Log-probs are of the next token, [b, s-1]:

    logprobs[:, i] = log p(tokens[:, i+1] | tokens[:, :i+1])      (at temperature T)

Training: loss_fn(logprobs, entropy, micro_batch) -> (loss, metrics), where loss is the
micro-batch's *share* of the step's loss (e.g. policy_loss with the step's global token count).
Megatron divides each micro-batch's loss by the number of micro-batches and averages gradients
over data-parallel ranks; we multiply both back, so the gradients are those of the sum of the
shares over all micro-batches and ranks (loss library contract, docs/losses.md).

A micro-batch with a "response_mask" [b, s-1] is scored only there: the output layer and the
log-softmax run on the response tokens alone (with length-bucketed rows, about half the positions
are prompt or padding), and its log-probs and entropies are 0 elsewhere. Without one, every
position is scored.

A token-separable loss (every loss in megatron_rpg.losses: separable_policy_loss) can also be given
per token: token_loss_fn(micro_batch) -> terms(logprobs [c], entropy [c], rows) -> [c], the
micro-batch's share as per-token terms of its flattened [b * (s-1)] tokens `rows` (a slice, or
the scored positions' indices). With the fused
path its gradients are then computed in the forward pass, chunk by chunk (fused_logprobs_loss:
three matmuls per chunk of logits instead of four, no recompute), and loss_fn runs on the detached
log-probs for its metrics only. Unfused, token_loss_fn is not used.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from megatron_rpg.logprobs import (
    Rows,
    TokenLoss,
    fused_logprobs,
    fused_logprobs_loss,
    vocab_parallel_logprobs_and_entropy,
)
from megatron_rpg.models.builder import unwrap
from megatron_rpg.parallel.groups import ProcessGroup, ProcessGroups

Batch = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor, Batch], tuple[Tensor, dict[str, Any]]]
TokenLossFn = Callable[[Batch], TokenLoss]


@dataclass(frozen=True)
class LogprobOptions:
    vocab_size: int  # the real vocabulary (Megatron's is padded)
    temperature: float = 1.0
    fused: bool = True  # from hidden states, never materializing more than a chunk of logits
    chunk_size: int | None = None  # tokens per chunk of logits; None: ~64 MiB blocks


def output_weight(gpt: Any) -> Tensor:
    """This rank's shard [V_local, H] of the output layer's weight (tied or not)."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def final_hidden_states(gpt: Any) -> Iterator[None]:
    """While active, the output layer returns its input, so the model returns the final hidden
    states [b, s, H] instead of logits. Under sequence parallelism they are all-gathered over the
    TP group (backward: split), as the output layer would."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    layer = gpt.output_layer

    def passthrough(hidden: Tensor, weight: Tensor | None = None, **_: Any) -> tuple[Tensor, None]:
        if layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None

    layer.forward = passthrough
    try:
        yield
    finally:
        del layer.forward


def model_inputs(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(position ids [b, s], causal mask [1, 1, s, s], True where attention is masked)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)[None, None]
    return position_ids, causal


def scored_positions(batch: Batch) -> Tensor | None:
    """Indices into the flattened [b * (s-1)] positions of those whose log-probs are used: where
    the micro-batch's "response_mask" is True; None (every position) without one."""
    mask = batch.get("response_mask")
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)


def _select(values: Tensor, scored: Tensor | None) -> Tensor:
    """[b, s-1, ...] -> [n, ...] at the scored positions (all of them, flattened, for None)."""
    flat = values.reshape(-1, *values.shape[2:])
    return flat if scored is None else flat[scored]


def _spread(values: Tensor, scored: Tensor | None, shape: torch.Size) -> Tensor:
    """[n] at the scored positions -> [b, s-1] with 0 elsewhere (differentiable)."""
    if scored is None:
        return values.reshape(shape)
    return values.new_zeros(shape.numel()).index_copy(0, scored, values).reshape(shape)


def sequence_logprobs(
    model: nn.Module,
    batch: Batch,
    options: LogprobOptions,
    tp_group: ProcessGroup,
) -> tuple[Tensor, Tensor] | Tensor:
    """Next-token (log-probs, entropies) [b, s-1] on the last stage (0 off the scored
    positions), else the stage output."""
    tokens = batch["tokens"]
    position_ids, causal = model_inputs(tokens)
    gpt = unwrap(model)
    if not gpt.post_process:
        return model(tokens, position_ids, causal)
    scored = scored_positions(batch)
    targets = _select(tokens[:, 1:], scored)
    args = (options.temperature, tp_group, options.chunk_size, options.vocab_size)
    if options.fused:
        with final_hidden_states(gpt):
            hidden = model(tokens, position_ids, causal)  # [b, s, H]
        out = fused_logprobs(_select(hidden[:, :-1], scored), output_weight(gpt), targets, *args)
    else:
        logits = model(tokens, position_ids, causal)  # [b, s, V_local]
        out = vocab_parallel_logprobs_and_entropy(_select(logits[:, :-1], scored), targets, *args)
    shape = tokens[:, 1:].shape
    return _spread(out[0], scored, shape), _spread(out[1], scored, shape)


def _token_loss_forward(
    model: nn.Module,
    batch: Batch,
    options: LogprobOptions,
    token_loss: TokenLoss,
    tp_group: ProcessGroup,
) -> Tensor:
    """Last stage, fused: [loss, logprobs..., entropy...] with the loss's gradients in forward,
    the output layer run on the scored positions only."""
    tokens = batch["tokens"]
    gpt = unwrap(model)
    with final_hidden_states(gpt):
        hidden = model(tokens, *model_inputs(tokens))
    scored = scored_positions(batch)

    def terms(lp: Tensor, entropy: Tensor, rows: Rows) -> Tensor:  # rows of the selection
        return token_loss(lp, entropy, rows if scored is None else scored[rows])

    loss, logprobs, entropy = fused_logprobs_loss(
        _select(hidden[:, :-1], scored),
        output_weight(gpt),
        _select(tokens[:, 1:], scored),
        terms,
        options.temperature,
        tp_group,
        options.chunk_size,
        options.vocab_size,
    )
    shape = tokens[:, 1:].shape
    return torch.cat(
        [
            loss.reshape(1),
            _spread(logprobs, scored, shape).reshape(-1),
            _spread(entropy, scored, shape).reshape(-1),
        ]
    )


class ScheduleTimes:
    """What a rank's pipeline schedules spent, as Megatron's timers report it (config.timers):
    its own forward and backward compute, and the schedule's whole time. The rest is waiting for
    other stages: `bubble` is that idle fraction, from these measured stage times."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started: dict[str, float] = {}

    def __call__(self, name: str, log_level: int | None = None) -> _Timer:
        return _Timer(self, name)

    @property
    def bubble(self) -> float:
        """1 - (forward + backward compute) / schedule time; 0 before any schedule ran."""
        total = self.seconds.get("forward-backward", 0.0)
        busy = self.seconds.get("forward-compute", 0.0) + self.seconds.get("backward-compute", 0.0)
        return max(0.0, 1.0 - busy / total) if total > 0 else 0.0


@dataclass
class _Timer:
    """Megatron's timer interface: config.timers(name).start() ... config.timers(name).stop()."""

    times: ScheduleTimes
    name: str

    def start(self, barrier: bool = False) -> None:
        self.times.started[self.name] = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        elapsed = time.perf_counter() - self.times.started.pop(self.name)
        self.times.seconds[self.name] = self.times.seconds.get(self.name, 0.0) + elapsed


def forward_backward(
    model_chunks: list[nn.Module],
    micro_batches: list[Batch],
    options: LogprobOptions,
    loss_fn: LossFn | None = None,
    token_loss_fn: TokenLossFn | None = None,
    groups: ProcessGroups | None = None,
    times: ScheduleTimes | None = None,
) -> list[dict[str, Any]]:
    """Run the schedule once over all micro-batches (groups: the layout's; omitted: Megatron's
    current ones). Forward only (no loss): per micro-batch {"logprobs", "entropy"} on the last
    pipeline stage. Training: per micro-batch the metrics of loss_fn there. [] elsewhere.
    Gradients accumulate in the chunks' (DDP) gradient buffers; the caller steps the optimizer.
    `times` (optional) accumulates the schedule's measured compute and wall time.

    Micro-batches may differ in shape: with pipeline parallelism the stages tell each other each
    activation's shape (Megatron's variable_seq_lengths, set by the builder), so the whole list is
    one schedule and the pipeline fills once. Under sequence parallelism a micro-batch is padded
    on the right to a multiple of TP tokens (its sequence is split over the TP ranks); its
    outputs are cut back to its own width."""
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    if token_loss_fn is not None and loss_fn is None:
        raise ValueError("token_loss_fn is a per-token form of loss_fn: give loss_fn too")
    config = unwrap(model_chunks[0]).config
    groups = groups or ProcessGroups.current()
    multiple = groups.tp_size if config.sequence_parallel else 1
    widths = [int(mb["tokens"].shape[1]) for mb in micro_batches]
    padded = [pad_to_multiple(mb, multiple) for mb in micro_batches]
    previous, config.timers = config.timers, times
    try:
        outputs = _schedule(model_chunks, padded, options, loss_fn, token_loss_fn, groups)
    finally:
        config.timers = previous
    if not unwrap(model_chunks[-1]).post_process:
        return []
    return [
        {k: v[:, : width - 1] if k in ("logprobs", "entropy") else v for k, v in out.items()}
        for out, width in zip(outputs, widths, strict=True)
    ]


def pad_to_multiple(batch: Batch, multiple: int) -> Batch:
    """The micro-batch with tokens [b, s] padded on the right to a multiple of `multiple`
    columns, and its per-position tensors [b, s-1, ...] alike (zeros: padding is never in a
    response_mask). Causal attention: no real position sees the padding."""
    b, s = batch["tokens"].shape
    extra = -s % multiple
    if not extra:
        return batch

    def pad(value: Any) -> Any:
        if (
            isinstance(value, Tensor)
            and value.dim() >= 2
            and value.shape[:2] in ((b, s), (b, s - 1))
        ):
            widths = [0, 0] * (value.dim() - 2) + [0, extra]
            return torch.nn.functional.pad(value, widths)
        return value

    return {key: pad(value) for key, value in batch.items()}


def _schedule(
    model_chunks: list[nn.Module],
    micro_batches: list[Batch],
    options: LogprobOptions,
    loss_fn: LossFn | None,
    token_loss_fn: TokenLossFn | None,
    groups: ProcessGroups,
) -> list[dict[str, Any]]:
    """One run of Megatron's schedule over the micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_size, seq_length = micro_batches[0]["tokens"].shape  # the first shape to receive
    scale = len(micro_batches) * groups.dp_size
    separable = token_loss_fn is not None and options.fused

    def loss_func(batch: Batch, output: Tensor) -> tuple[Tensor, dict[str, Any]]:
        if separable:  # [loss, logprobs..., entropy...] from _token_loss_forward
            assert loss_fn is not None
            shape = batch["tokens"][:, 1:].shape
            logprobs, entropy = output[1:].detach().reshape(2, *shape)
            _, metrics = loss_fn(logprobs, entropy, batch)  # detached: metrics only
            return output[0] * scale, metrics
        logprobs, entropy = output[0], output[1]
        if loss_fn is None:
            return output.sum() * 0.0, {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
        loss, metrics = loss_fn(logprobs, entropy, batch)
        return loss * scale, metrics

    def forward_step(data_iterator: Iterator[Batch], model: nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        if separable and unwrap(model).post_process:
            assert token_loss_fn is not None
            output = _token_loss_forward(model, batch, options, token_loss_fn(batch), groups.tp)
            return output, functools.partial(loss_func, batch)
        out = sequence_logprobs(model, batch, options, groups.tp)
        if isinstance(out, Tensor):  # not the last stage: activations for the next one
            return out, None
        return torch.stack(out), functools.partial(loss_func, batch)

    device = next(model_chunks[0].parameters()).device  # batches may arrive on the CPU
    micro_batches = [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in mb.items()}
        for mb in micro_batches
    ]
    data = [iter(micro_batches) for _ in model_chunks]
    forward_only = loss_fn is None
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data if len(model_chunks) > 1 else data[0],
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_size,
            forward_only=forward_only,
        )


def full_logits(
    model_chunks: list[nn.Module],
    tokens: Tensor,
    vocab_size: int,
    groups: ProcessGroups | None = None,
) -> Tensor | None:
    """Logits [b, s, vocab_size] for one batch through the schedule, all-gathered over the TP group
    on the last pipeline stage (None elsewhere). For checks (conversion --verify), not training:
    it materializes the full vocabulary."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    position_ids, causal = model_inputs(tokens)
    tp = (groups or ProcessGroups.current()).tp

    def gather(logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(tp))]
        torch.distributed.all_gather(parts, logits.contiguous(), group=tp)
        return logits.sum() * 0.0, {"logits": torch.cat(parts, -1)[..., :vocab_size]}

    def forward_step(data: Iterator[Tensor], model: nn.Module) -> tuple[Tensor, Any]:
        out = model(next(data), position_ids, causal)
        return out, gather if unwrap(model).post_process else None

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([tokens]) for _ in model_chunks]
            if len(model_chunks) > 1
            else iter([tokens]),
            model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    return out[0]["logits"] if out else None
