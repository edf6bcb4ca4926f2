"""Megatron's pipeline schedule over micro-batches, producing per-token log-probs and entropies
on the last pipeline stage, either returned (forward only) or fed to a loss (training).

A micro-batch is a dict with "tokens" [b, s] (prompt + response, right-padded) plus whatever the
loss reads. Micro-batches may differ in shape (length-bucketed: each only as wide as its longest
sequence): the schedule runs once per shape, gradients accumulating, and the gradient
finalization (data-parallel all-reduce, tied embeddings across stages) runs once, after the
last. Log-probs are of the next token, [b, s-1]:

    logprobs[:, i] = log p(tokens[:, i+1] | tokens[:, :i+1])      (at temperature T)

Training: loss_fn(logprobs, entropy, micro_batch) -> (loss, metrics), where loss is the
micro-batch's *share* of the step's loss (e.g. policy_loss with the step's global token count).
Megatron divides each micro-batch's loss by the number of micro-batches and averages gradients
over data-parallel ranks; we multiply both back, so the gradients are those of the sum of the
shares over all micro-batches and ranks (loss library contract, docs/losses.md).

A token-separable loss can be given instead as token_loss_fn(logprobs [c], entropy [c], batch,
rows) -> per-token terms [c], for the flattened tokens `rows` of the micro-batch's [b * (s-1)]; with
the fused path its gradients are then computed in the forward pass (fused_logprobs_loss: three
matmuls per chunk of logits instead of four).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from megatron_rpg.logprobs import (
    fused_logprobs,
    fused_logprobs_loss,
    vocab_parallel_logprobs_and_entropy,
)
from megatron_rpg.models.builder import unwrap

Batch = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor, Batch], tuple[Tensor, dict[str, Any]]]
TokenLossFn = Callable[[Tensor, Tensor, Batch, slice], Tensor]


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


def sequence_logprobs(
    model: nn.Module, tokens: Tensor, options: LogprobOptions
) -> tuple[Tensor, Tensor] | Tensor:
    """Next-token (log-probs, entropies) [b, s-1] on the last stage, else the stage output."""
    from megatron.core import parallel_state

    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)[None, None]
    gpt = unwrap(model)
    if not gpt.post_process:
        return model(tokens, position_ids, causal)
    group = parallel_state.get_tensor_model_parallel_group()
    targets = tokens[:, 1:]
    args = (options.temperature, group, options.chunk_size, options.vocab_size)
    if options.fused:
        with final_hidden_states(gpt):
            hidden = model(tokens, position_ids, causal)  # [b, s, H]
        return fused_logprobs(hidden[:, :-1], output_weight(gpt), targets, *args)
    logits = model(tokens, position_ids, causal)  # [b, s, V_local]
    return vocab_parallel_logprobs_and_entropy(logits[:, :-1], targets, *args)


def _token_loss_forward(
    model: nn.Module, batch: Batch, options: LogprobOptions, token_loss_fn: TokenLossFn
) -> Tensor:
    """Last stage, fused: [loss, logprobs..., entropy...] with the loss's gradients in forward."""
    from megatron.core import parallel_state

    tokens = batch["tokens"]
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)[None, None]
    gpt = unwrap(model)
    with final_hidden_states(gpt):
        hidden = model(tokens, position_ids, causal)
    loss, logprobs, entropy = fused_logprobs_loss(
        hidden[:, :-1],
        output_weight(gpt),
        tokens[:, 1:],
        lambda lp, ent, rows: token_loss_fn(lp, ent, batch, rows),
        options.temperature,
        parallel_state.get_tensor_model_parallel_group(),
        options.chunk_size,
        options.vocab_size,
    )
    return torch.cat([loss.reshape(1), logprobs.reshape(-1), entropy.reshape(-1)])


def forward_backward(
    model_chunks: list[nn.Module],
    micro_batches: list[Batch],
    options: LogprobOptions,
    loss_fn: LossFn | None = None,
    token_loss_fn: TokenLossFn | None = None,
) -> list[dict[str, Any]]:
    """Run the schedule. Forward only (no loss): per micro-batch {"logprobs", "entropy"} on the
    last pipeline stage. Training: per micro-batch the metrics of loss_fn there ({"logprobs",
    "entropy"} with token_loss_fn). [] elsewhere. Gradients accumulate in the chunks' (DDP)
    gradient buffers; the caller steps the optimizer."""
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    if loss_fn is not None and token_loss_fn is not None:
        raise ValueError("give loss_fn or token_loss_fn, not both")
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, mb in enumerate(micro_batches):
        by_shape.setdefault(tuple(mb["tokens"].shape), []).append(i)
    config = unwrap(model_chunks[0]).config
    finalize = config.finalize_model_grads_func
    results: list[dict[str, Any]] = [{} for _ in micro_batches]
    try:
        for n, indices in enumerate(by_shape.values()):
            config.finalize_model_grads_func = finalize if n == len(by_shape) - 1 else None
            outputs = _schedule(
                model_chunks, [micro_batches[i] for i in indices], options, loss_fn, token_loss_fn
            )
            for i, out in zip(indices, outputs, strict=False):  # [] off the last stage
                results[i] = out
    finally:
        config.finalize_model_grads_func = finalize
    return results if unwrap(model_chunks[-1]).post_process else []


def _schedule(
    model_chunks: list[nn.Module],
    micro_batches: list[Batch],
    options: LogprobOptions,
    loss_fn: LossFn | None,
    token_loss_fn: TokenLossFn | None,
) -> list[dict[str, Any]]:
    """One run of Megatron's schedule over micro-batches of one shape."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro_size, seq_length = micro_batches[0]["tokens"].shape
    scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()
    separable = token_loss_fn is not None and options.fused

    def loss_func(batch: Batch, output: Tensor) -> tuple[Tensor, dict[str, Any]]:
        if separable:  # [loss, logprobs..., entropy...] from _token_loss_forward
            shape = (micro_size, seq_length - 1)
            logprobs, entropy = output[1:].reshape(2, *shape)
            return output[0] * scale, {"logprobs": logprobs, "entropy": entropy}
        logprobs, entropy = output[0], output[1]
        if token_loss_fn is not None:  # unfused path: evaluate the terms on all tokens at once
            terms = token_loss_fn(logprobs.reshape(-1), entropy.reshape(-1), batch, slice(None))
            detached = {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
            return terms.sum() * scale, detached
        if loss_fn is None:
            return output.sum() * 0.0, {"logprobs": logprobs.detach(), "entropy": entropy.detach()}
        loss, metrics = loss_fn(logprobs, entropy, batch)
        return loss * scale, metrics

    def forward_step(data_iterator: Iterator[Batch], model: nn.Module) -> tuple[Tensor, Any]:
        batch = next(data_iterator)
        if separable and unwrap(model).post_process:
            assert token_loss_fn is not None
            output = _token_loss_forward(model, batch, options, token_loss_fn)
            return output, functools.partial(loss_func, batch)
        out = sequence_logprobs(model, batch["tokens"], options)
        if isinstance(out, Tensor):  # not the last stage: activations for the next one
            return out, None
        return torch.stack(out), functools.partial(loss_func, batch)

    device = next(model_chunks[0].parameters()).device  # batches may arrive on the CPU
    micro_batches = [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in mb.items()}
        for mb in micro_batches
    ]
    data = [iter(micro_batches) for _ in model_chunks]
    forward_only = loss_fn is None and token_loss_fn is None
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


def full_logits(model_chunks: list[nn.Module], tokens: Tensor, vocab_size: int) -> Tensor | None:
    """Logits [b, s, vocab_size] for one batch through the schedule, all-gathered over the TP group
    on the last pipeline stage (None elsewhere). For checks (conversion --verify), not training:
    it materializes the full vocabulary."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1)[None, None]

    def gather(logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [
            torch.empty_like(logits)
            for _ in range(parallel_state.get_tensor_model_parallel_world_size())
        ]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
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
