"""The embedded rollout engine: a `transformers` model of the policy's family, fed by the same
weight stream as vLLM, so the whole RL loop runs (and is tested) on CPU machines.

    engine = EmbeddedEngine(hf_config)                  # random weights until the first sync
    engine.update_weights(iter_hf_weights(chunks, arch))
    responses = engine.generate([[5, 17, 3]], SamplingParams(n=4, max_tokens=32, seed=0,
                                                             stop_token_ids=(eos,)))

Batched sampling with a KV cache: prompts are left-padded, each row stops on its own; rows of a
batch keep their own positions. Sampling is seeded per response, as vLLM seeds requests: sample i
of prompt p draws from its own generator seeded with seed + p * n + i, so a response does not
depend on the batch it was generated in. Log-probs are computed in fp32 (see
protocol.py for which distribution they describe). The engine has no tokenizer: pass the end
of sequence token in stop_token_ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from megatron_rpg.models.export import FULL
from megatron_rpg.parallel.groups import ProcessGroups
from megatron_rpg.rollout.protocol import Response, SamplingParams, check_prompts


class EmbeddedEngine:
    collective = False  # one process generates (rank 0 in the trainer)

    def __init__(
        self,
        hf_config: dict[str, Any],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_batch_size: int = 64,
    ):
        import transformers

        config = transformers.AutoConfig.for_model(**hf_config)
        config._attn_implementation = "eager"  # additive masks: no NaN rows under left padding
        self.device = torch.device(device)
        self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.vocab_size = int(config.vocab_size)
        self.max_len = int(config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.weights_complete = True  # False after a sync that failed halfway
        self.asleep = False

    # weights ------------------------------------------------------------------------------------

    @torch.no_grad()
    def weight_layout(self, groups: ProcessGroups) -> str:
        """Full tensors: the engine is one process."""
        return FULL

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Copy every parameter from the stream (each exactly once); returns the bytes received.
        A stream that misses a parameter or names an unknown one raises, and the engine then
        refuses to generate until a complete sync arrives."""
        params = dict(self.model.named_parameters())  # a tied lm_head is not listed
        received: set[str] = set()
        nbytes = 0
        self.weights_complete = False
        for name, tensor in weights:
            param = params.get(name)
            if param is None:
                raise KeyError(f"update_weights: the engine's model has no parameter {name!r}")
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the engine's "
                    f"parameter {tuple(param.shape)}"
                )
            if name in received:
                raise ValueError(f"update_weights: {name!r} was sent twice")
            param.copy_(tensor)
            received.add(name)
            nbytes += tensor.numel() * tensor.element_size()
        missing = sorted(set(params) - received)
        if missing:
            raise ValueError(
                f"update_weights: the stream did not send {missing[:3]} ({len(missing)} missing)"
            )
        self.weights_complete = True
        return nbytes

    def sleep(self) -> None:
        """Release accelerator memory (weights to host memory); a no-op on the CPU."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        self.model.to(self.device)
        self.asleep = False

    def close(self) -> None:
        """Nothing to release beyond the model, which goes with the engine."""

    # generation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        if self.asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        if not self.weights_complete:
            raise RuntimeError("generate: the last weight update was incomplete")
        check_prompts(prompts, self.vocab_size, self.max_len)
        base = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
        rows = [list(p) for p in prompts for _ in range(params.n)]
        generators = [torch.Generator().manual_seed(base + i) for i in range(len(rows))]
        responses: list[Response] = []
        for start in range(0, len(rows), self.max_batch_size):
            end = start + self.max_batch_size
            responses.extend(self._generate_batch(rows[start:end], params, generators[start:end]))
        return [responses[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(
        self, rows: list[list[int]], params: SamplingParams, generators: list[torch.Generator]
    ) -> list[Response]:
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # left padding
            input_ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        limits = [min(params.max_tokens, self.max_len - len(r)) for r in rows]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, positions = (t.to(self.device) for t in (input_ids, mask, positions))
        stop = set(params.stop_token_ids)
        out = [Response([], [], "length") for _ in rows]
        active = set(range(len(rows)))
        cache = None
        for step in range(max(limits)):
            result = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = result.past_key_values
            tokens, logprobs = sample(result.logits[:, -1].float(), params, generators)
            for i in list(active):
                token = int(tokens[i])
                out[i].token_ids.append(token)
                out[i].logprobs.append(float(logprobs[i]))
                if token in stop:
                    out[i].finish_reason = "stop"
                    active.discard(i)
                elif step + 1 >= limits[i]:
                    active.discard(i)
            if not active:
                break
            input_ids = tokens[:, None].to(self.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
        return out


def sample(
    logits: Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """Draw one token per row (row i from generators[i]) from softmax(logits / T) restricted to
    top-k / top-p; return the tokens and their log-probs under that renormalized distribution,
    in fp32, on the CPU."""
    scaled = logits.float().cpu() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    logprobs = torch.log_softmax(scaled, dim=-1)
    probs = logprobs.exp()
    tokens = torch.cat(
        [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)]
    )
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
