"""Per-token log-probs and entropies from vocab-parallel logits, never gathering the vocabulary.

Results are fp32 (fp64 for fp64 inputs).

Logits are sharded on the last dim over the tensor-parallel group `group`: rank r holds vocabulary
entries [r*V_local, (r+1)*V_local). `group` omitted: Megatron's TP group when model parallelism
is initialized, else the logits are the whole vocabulary. With x = logits / temperature:

    lse        = log sum_v exp(x_v)                      (online over the TP shards)
    log p(y)   = x_y - lse
    entropy    = lse - E_p[x]
    d log p(y) / dx_v = ([v = y] - p_v) / T,    d entropy / dx_v = -p_v (x_v - E_p[x]) / T

Collectives per chunk of tokens, on `group` (none when it is None or of size 1):
all-reduce MAX of the row max, then one all-reduce SUM of the stacked [sum of exps, target logit,
sum of exp * x]. Tokens are processed in chunks of `chunk_size` (default: auto_chunk_size, about
64 MiB of fp32 logits), so the extra memory is a few
[chunk, V_local] blocks, not [tokens, V_local]; backward recomputes the softmax per chunk from
the saved per-token lse and E_p[x] ([tokens] each). Inputs are never modified in place.

Megatron pads the vocabulary to a multiple of 128 (and of TP); `vocab_size` (the real one) keeps the
padded entries out of the softmax, as vLLM and Hugging Face compute it.

`fused_logprobs` goes from the final hidden states and the output layer's weight shard: logits exist
one chunk at a time, in forward and (recomputed) in backward. The old and reference log-probs'
path, and the update's when a loss is not token-separable.

`fused_logprobs_loss` is for token-separable losses (the trainer's update): the loss's gradient
with respect to each token's log-prob is known inside the chunk, so the logits' gradients, and from
them the hidden states' and weight's, are computed in the forward pass (no recompute;
benchmarks/logprobs.py, benchmarks/train_step.py).

The autograd Functions' `type: ignore[override]`: torch's stubs declare forward/backward as
(ctx, *args, **kwargs); ours name their arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

CHUNK_BYTES = 64 * 2**20  # one [chunk, V_local] fp32 block of logits (~110 tokens at V=152k)


def auto_chunk_size(local_vocab: int) -> int:
    """Tokens per chunk so that a block of fp32 logits is about CHUNK_BYTES (a multiple of 16)."""
    return max(16, CHUNK_BYTES // (4 * max(local_vocab, 1)) // 16 * 16)


ProcessGroup = Any  # torch.distributed.ProcessGroup | None


def _default_group(group: ProcessGroup) -> ProcessGroup:
    """`group`, else Megatron's tensor-parallel group when model parallelism is initialized (a
    TP shard of logits is never read as the whole vocabulary), else None: the whole vocabulary."""
    from megatron_rpg.parallel.groups import current_tp_group

    return group if group is not None else current_tp_group()


def _world(group: ProcessGroup) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(tensor: Tensor, op: Any, group: ProcessGroup) -> None:
    if _world(group)[0] > 1:
        dist.all_reduce(tensor, op=op, group=group)


@dataclass
class _Targets:
    """Targets of a chunk in this rank's vocabulary shard."""

    local: Tensor  # [c] index into the shard (clamped)
    in_shard: Tensor  # [c] bool

    @classmethod
    def of(cls, targets: Tensor, vocab_start: int, local_vocab: int) -> _Targets:
        local = targets - vocab_start
        in_shard = (local >= 0) & (local < local_vocab)
        return cls(local.clamp(0, local_vocab - 1), in_shard)


def _chunk_statistics(
    x: Tensor, targets: _Targets | None, group: ProcessGroup
) -> tuple[Tensor, Tensor | None, Tensor]:
    """x: [c, V_local] scaled logits -> (lse [c], target logit [c] or None, E_p[x] [c])."""
    if x.shape[-1]:
        row_max = x.max(dim=-1).values
    else:  # this rank's shard is all vocabulary padding
        row_max = torch.full(x.shape[:1], float("-inf"), dtype=x.dtype, device=x.device)
    _all_reduce(row_max, dist.ReduceOp.MAX, group)
    exp = (x - row_max[:, None]).exp_()
    sum_exp_x = (exp[:, None, :] @ x[:, :, None]).reshape(-1)  # row-wise dot, no [c, V] temp
    parts = [exp.sum(-1), sum_exp_x]
    if targets is not None:
        picked = x.gather(-1, targets.local[:, None]).squeeze(-1) if x.shape[-1] else row_max
        parts.append(torch.where(targets.in_shard, picked, torch.zeros_like(picked)))
    stacked = torch.stack(parts)
    _all_reduce(stacked, dist.ReduceOp.SUM, group)
    lse = row_max + stacked[0].log()
    mean_x = stacked[1] / stacked[0]
    return lse, (stacked[2] if targets is not None else None), mean_x


def _chunk_grad_logits(
    x: Tensor,
    lse: Tensor,
    mean_x: Tensor,
    targets: _Targets | None,
    grad_logprobs: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """d(sum grad_lp * log p(y) + grad_ent * entropy) / d logits for one chunk, [c, V_local]:
    -p * (grad_lp + grad_ent * (x - E_p[x])), plus grad_lp at the target, over T."""
    grad = (x - lse[:, None]).exp_()  # p; every later step is in place
    if (grad_logprobs is None and grad_entropy is None) or not x.shape[-1]:
        return grad.zero_()
    weight = torch.zeros_like(lse) if grad_logprobs is None else grad_logprobs.to(lse.dtype)
    if grad_entropy is not None:
        grad.mul_((x - mean_x[:, None]).mul_(grad_entropy[:, None]).add_(weight[:, None]))
    else:
        grad.mul_(weight[:, None])
    grad.neg_()
    if grad_logprobs is not None and targets is not None:
        hit = torch.where(targets.in_shard, weight, torch.zeros_like(weight))
        grad.scatter_add_(-1, targets.local[:, None], hit[:, None])
    return grad if temperature == 1.0 else grad.div_(temperature)


@dataclass(frozen=True)
class _Shard:
    """This rank's slice of the (padded) vocabulary: [start, start + width), of which the first
    `valid` entries are real tokens."""

    start: int
    width: int
    valid: int

    @classmethod
    def of(cls, local_vocab: int, group: ProcessGroup, vocab_size: int | None) -> _Shard:
        start = _world(group)[1] * local_vocab
        real = local_vocab if vocab_size is None else min(max(vocab_size - start, 0), local_vocab)
        return cls(start, local_vocab, real)

    def targets(self, targets: Tensor) -> _Targets:
        return _Targets.of(targets, self.start, max(self.valid, 1))


def _scaled(logits: Tensor, dtype: torch.dtype, temperature: float) -> Tensor:
    """logits / T in the compute dtype (a copy only where one is needed)."""
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 inputs (exact tests)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _chunks(n: int, chunk_size: int) -> list[slice]:
    return [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


class _VocabParallelLogprobs(torch.autograd.Function):
    """(logits [N, V_local], targets [N] or None) -> (log p(target) [N] or empty, entropy [N])."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        targets: Tensor | None,
        temperature: float,
        chunk_size: int,
        group: ProcessGroup,
        vocab_size: int | None,
    ) -> tuple[Tensor, Tensor]:
        n = logits.shape[0]
        shard = _Shard.of(logits.shape[1], group, vocab_size)
        dtype = _compute_dtype(logits)
        lse, mean_x = (torch.empty(n, dtype=dtype, device=logits.device) for _ in range(2))
        logprobs = torch.empty(n if targets is not None else 0, dtype=dtype, device=logits.device)
        for rows in _chunks(n, chunk_size):
            x = _scaled(logits[rows, : shard.valid], dtype, temperature)
            tgt = None if targets is None else shard.targets(targets[rows])
            lse[rows], picked, mean_x[rows] = _chunk_statistics(x, tgt, group)
            if picked is not None:
                logprobs[rows] = picked - lse[rows]
        ctx.save_for_backward(logits, targets, lse, mean_x)
        ctx.set_materialize_grads(False)  # an unused output (e.g. entropy) gets None: skipped
        ctx.temperature, ctx.chunk_size, ctx.shard = temperature, chunk_size, shard
        return logprobs, lse - mean_x

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> Any:  # type: ignore[override]
        logits, targets, lse, mean_x = ctx.saved_tensors
        shard = ctx.shard
        grad = torch.zeros_like(logits)  # padded vocabulary entries get zero gradient
        for rows in _chunks(logits.shape[0], ctx.chunk_size):
            x = _scaled(logits[rows, : shard.valid], lse.dtype, ctx.temperature)
            tgt = None if targets is None else shard.targets(targets[rows])
            grad[rows, : shard.valid] = _chunk_grad_logits(
                x,
                lse[rows],
                mean_x[rows],
                tgt,
                None if targets is None or grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                ctx.temperature,
            ).to(logits.dtype)
        return grad, None, None, None, None, None


def _through_linear(grad_x: Tensor, h: Tensor, weight_rows: Tensor, grad_weight: Tensor) -> Tensor:
    """Backward through logits = h @ weight_rows^T for one chunk: adds grad_x^T h into
    grad_weight (fp32, in place: no [V, H] temporary; a bf16 product is accumulated in fp32) and
    returns grad_h = grad_x @ weight_rows [c, H]."""
    grad_x = grad_x.to(weight_rows.dtype)
    if grad_x.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_x.t(), h)
    else:
        grad_weight += (grad_x.t() @ h).to(grad_weight.dtype)
    return grad_x @ weight_rows


class _FusedLinearLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V_local, H], targets [N]) -> (log p(target) [N], entropy [N]).

    Collectives on `group`: per chunk those of the module docstring; in backward one all-reduce SUM
    of grad_hidden (each rank's vocabulary shard contributes a partial sum, as Megatron's
    copy_to_tensor_model_parallel_region does before the output layer).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        temperature: float,
        chunk_size: int,
        group: ProcessGroup,
        vocab_size: int | None,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        shard = _Shard.of(weight.shape[0], group, vocab_size)
        real_rows = weight[: shard.valid]
        dtype = _compute_dtype(weight)
        lse, mean_x, logprobs = (
            torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(3)
        )
        for rows in _chunks(n, chunk_size):
            x = _scaled(hidden[rows].to(weight.dtype) @ real_rows.t(), dtype, temperature)
            lse[rows], picked, mean_x[rows] = _chunk_statistics(
                x, shard.targets(targets[rows]), group
            )
            assert picked is not None  # targets given
            logprobs[rows] = picked - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse, mean_x)
        ctx.set_materialize_grads(False)
        ctx.temperature, ctx.chunk_size, ctx.group = temperature, chunk_size, group
        ctx.shard = shard
        return logprobs, lse - mean_x

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None) -> Any:  # type: ignore[override]
        hidden, weight, targets, lse, mean_x = ctx.saved_tensors
        shard = ctx.shard
        real_rows = weight[: shard.valid]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
        for rows in _chunks(hidden.shape[0], ctx.chunk_size):
            h = hidden[rows].to(weight.dtype)
            x = _scaled(h @ real_rows.t(), lse.dtype, ctx.temperature)
            grad_x = _chunk_grad_logits(
                x,
                lse[rows],
                mean_x[rows],
                shard.targets(targets[rows]),
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
                ctx.temperature,
            )
            grad_hidden[rows] = _through_linear(grad_x, h, real_rows, grad_weight[: shard.valid])
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


Rows = slice | Tensor  # tokens of the flattened batch: a chunk's slice, or their indices
TokenLoss = Callable[[Tensor, Tensor, Rows], Tensor]


class _FusedLinearTokenLoss(torch.autograd.Function):
    """(hidden, weight, targets, token_loss) -> (sum of token_loss, log-probs, entropies).

    For a token-separable loss L = sum_t token_loss(lp_t, ent_t) the gradient with respect to the
    logits of token t needs only dL/dlp_t and dL/dent_t, which the chunk itself provides. So each
    chunk's forward computes the logits, the loss terms, their gradients and at once
    grad_hidden = G @ W and grad_weight += G^T @ h: three matmuls per chunk and no recompute (as
    Liger does for cross-entropy). Backward only scales the held gradients by the incoming scalar.
    Collectives: those of `_FusedLinearLogprobs`, all in forward. The log-probs and entropies are
    returned detached (for metrics).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        token_loss: TokenLoss,
        temperature: float,
        chunk_size: int,
        group: ProcessGroup,
        vocab_size: int | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        n = hidden.shape[0]
        shard = _Shard.of(weight.shape[0], group, vocab_size)
        real_rows = weight[: shard.valid]
        dtype = _compute_dtype(weight)
        logprobs, entropy = (torch.empty(n, dtype=dtype, device=hidden.device) for _ in range(2))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for rows in _chunks(n, chunk_size):
            h = hidden[rows].to(weight.dtype)
            x = _scaled(h @ real_rows.t(), dtype, temperature)
            tgt = shard.targets(targets[rows])
            lse, picked, mean_x = _chunk_statistics(x, tgt, group)
            assert picked is not None  # targets given
            lp = (picked - lse).requires_grad_()
            ent = (lse - mean_x).requires_grad_()
            with torch.enable_grad():
                terms = token_loss(lp, ent, rows).sum()
                grad_lp, grad_ent = torch.autograd.grad(terms, (lp, ent), allow_unused=True)
            total += terms.detach()
            logprobs[rows], entropy[rows] = lp.detach(), ent.detach()
            grad_x = _chunk_grad_logits(x, lse, mean_x, tgt, grad_lp, grad_ent, temperature)
            grad_hidden[rows] = _through_linear(grad_x, h, real_rows, grad_weight[: shard.valid])
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(logprobs, entropy)
        return total, logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Any) -> Any:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, grad_weight * grad_total, *([None] * 6)


def fused_logprobs_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss: TokenLoss,
    temperature: float = 1.0,
    group: ProcessGroup = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, log-probs, entropies) for a token-separable loss, gradients computed in forward.

    token_loss(logprobs [c], entropy [c], rows) -> per-token loss terms [c]; `rows` is the slice of
    flattened tokens (hidden.reshape(-1, H)) in the chunk. Each term may depend only on its own
    token's log-prob and entropy (true of every loss in megatron_rpg.losses with the step's global
    counts). The returned loss is their sum; log-probs and entropies are detached.
    """
    _check_linear(hidden, weight)
    _check(hidden, targets, temperature, chunk_size)
    loss, logprobs, entropy = _FusedLinearTokenLoss.apply(
        _flatten(hidden, True),
        weight,
        _flatten(targets, False),
        token_loss,
        temperature,
        chunk_size or auto_chunk_size(weight.shape[0]),
        _default_group(group),
        vocab_size,
    )
    return loss, logprobs.reshape(targets.shape), entropy.reshape(targets.shape)


def _flatten(tensor: Tensor, keep_last: bool) -> Tensor:
    return tensor.reshape(-1, tensor.shape[-1]) if keep_last else tensor.reshape(-1)


def vocab_parallel_logprobs_and_entropy(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    group: ProcessGroup = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(log p(target), entropy) in fp32, [...], from logits [..., V_local] sharded over `group`,
    in one pass over the logits (one set of collectives); targets [...]."""
    _check(logits, targets, temperature, chunk_size)
    logprobs, entropy = _VocabParallelLogprobs.apply(
        _flatten(logits, True),
        _flatten(targets, False),
        temperature,
        chunk_size or auto_chunk_size(logits.shape[-1]),
        _default_group(group),
        vocab_size,
    )
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)


def vocab_parallel_logprobs(
    logits: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    group: ProcessGroup = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """log p(target) in fp32 (the entropy's statistics cost one reduction more, no extra pass)."""
    args = (temperature, group, chunk_size, vocab_size)
    return vocab_parallel_logprobs_and_entropy(logits, targets, *args)[0]


def vocab_parallel_entropy(
    logits: Tensor,
    temperature: float = 1.0,
    group: ProcessGroup = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Entropy of softmax(logits / temperature) in fp32, [...], from logits [..., V_local]."""
    _check(logits, None, temperature, chunk_size)
    chunk = chunk_size or auto_chunk_size(logits.shape[-1])
    _, entropy = _VocabParallelLogprobs.apply(
        _flatten(logits, True), None, temperature, chunk, _default_group(group), vocab_size
    )
    return entropy.reshape(logits.shape[:-1])


def fused_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    group: ProcessGroup = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(log p(target), entropy) in fp32 from final hidden states [..., H] (replicated over the TP
    group) and the output layer's weight shard [V_local, H], one chunk of logits at a time."""
    _check_linear(hidden, weight)
    _check(hidden, targets, temperature, chunk_size)
    logprobs, entropy = _FusedLinearLogprobs.apply(
        _flatten(hidden, True),
        weight,
        _flatten(targets, False),
        temperature,
        chunk_size or auto_chunk_size(weight.shape[0]),
        _default_group(group),
        vocab_size,
    )
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)


def _check_linear(hidden: Tensor, weight: Tensor) -> None:
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(
            f"hidden [..., {hidden.shape[-1]}] does not match output weight {tuple(weight.shape)}"
        )


def _check(
    values: Tensor, targets: Tensor | None, temperature: float, chunk_size: int | None
) -> None:
    if targets is not None and tuple(values.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets {tuple(targets.shape)} must match the leading dims of {tuple(values.shape)}"
        )
    if targets is not None and targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
