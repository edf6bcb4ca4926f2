"""vLLM rollout engines (GPU only; vLLM is imported when an engine is built). Written against
vLLM 0.33's public API (../shared/docs/vllm_api.md); the `gpu` extra pins that version.

    VLLMEngine(hf_dir, tensor_parallel=2)      colocated: an in-process `vllm.LLM` on the job's
                                               GPUs; weights through the `ipc` transfer engine
    VLLMServerEngine("http://node7:8000", ...) disaggregated: a `vllm serve` on other nodes;
                                               weights broadcast over NCCL from trainer rank 0

Both take the trainer's export stream (full HF tensors, models/export.py) whatever the engine's
own TP, and report `processed_logprobs` (temperature applied, fp32, lm_head in fp32), which equal
the trainer's log-probs when top_k=0 and top_p=1. The prefix cache is reset after every sync
(vLLM does not do it). Sampling parameters are passed in full: vLLM's hidden defaults
(max_tokens=16, generation_config.json) never apply.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from megatron_rpg.models.export import WeightStream
from megatron_rpg.rollout.protocol import Response, SamplingParams

ENGINE_OPTIONS = dict(
    logprobs_mode="processed_logprobs",
    generation_config="vllm",
    hf_overrides={"head_dtype": "float32"},
    skip_tokenizer_init=True,
)


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as vllm.SamplingParams keyword arguments (sampled-token log-prob only)."""
    return dict(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids),
        seed=params.seed, logprobs=0, detokenize=False,
    )  # fmt: skip


def response_from_completion(completion: Any) -> Response:
    """A vLLM CompletionOutput -> Response (the sampled token comes first in each position)."""
    tokens = list(completion.token_ids)
    positions = list(completion.logprobs or [])
    if len(positions) != len(tokens):
        raise ValueError(f"vLLM returned {len(positions)} log-probs for {len(tokens)} tokens")
    logprobs = [pos[token].logprob for pos, token in zip(positions, tokens, strict=True)]
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a response with {completion.finish_reason!r}")
    return Response(tokens, logprobs, completion.finish_reason)


def _weight_source(stream_holder: Any) -> Any:
    """A vllm WeightSource over the current export stream (metadata known before any data)."""
    import torch
    from vllm.distributed.weight_transfer import ParamMeta, WeightSource

    class ExportSource(WeightSource):  # type: ignore[misc]
        @cached_property
        def metadata(self) -> list[Any]:
            return [ParamMeta(n, d, s) for n, s, d in stream_holder.stream.metadata]

        def iter_full(self) -> Iterable[tuple[str, torch.Tensor]]:
            return iter(stream_holder.stream)

    return ExportSource()


class _LocalClient:
    """vLLM's weight-sync client protocol over an in-process LLM."""

    def __init__(self, llm: Any):
        self.llm = llm

    def __getattr__(self, name: str) -> Any:
        if name in ("init_weight_transfer_engine", "start_weight_update", "update_weights",
                    "finish_weight_update", "update_weight_version"):  # fmt: skip
            return getattr(self.llm, name)
        raise AttributeError(name)


class _Transfer:
    """Trainer side of a vLLM weight-transfer engine; every trainer rank takes part."""

    def __init__(self, init_info: Any, client: Any):
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        self.stream: WeightStream | None = None
        self.engine = WeightTransferTrainerFactory.trainer_init(
            init_info, client=client, source=_weight_source(self)
        )

    def send(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        if not isinstance(weights, WeightStream):
            raise TypeError("vLLM engines take the export stream (iter_hf_weights), which "
                            "announces its metadata first")  # fmt: skip
        if self.stream is not None and self.stream.metadata != weights.metadata:
            raise ValueError("the exported tensors changed between syncs")
        self.stream = weights
        self.engine.send_weights()
        return weights.nbytes


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class VLLMEngine:
    """Colocated vLLM in the training process: sleep() before training frees its memory."""

    def __init__(
        self,
        hf_dir: str | Path,
        tensor_parallel: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        seed: int = 0,
        load_format: str = "dummy",  # the first weights come from the trainer; "auto": hf_dir's
    ):
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        self.llm = LLM(
            model=str(hf_dir), tensor_parallel_size=tensor_parallel, dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_sleep_mode=True, weight_transfer_config=WeightTransferConfig(backend="ipc"),
            load_format=load_format, **ENGINE_OPTIONS,
        )  # fmt: skip
        self._transfer: _Transfer | None = None

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            VLLMSamplingParams(**vllm_sampling_kwargs(params)),
            use_tqdm=False,
        )
        return [[response_from_completion(c) for c in out.outputs] for out in outputs]

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        if self._transfer is None:
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            self._transfer = _Transfer(
                IPCTrainerInitInfo(rank=_rank(), packed=True), _LocalClient(self.llm)
            )
        nbytes = self._transfer.send(weights)
        self.llm.reset_prefix_cache()
        return nbytes

    def sleep(self) -> None:
        self.llm.sleep(level=1)  # weights to pinned host memory, KV cache dropped

    def wake(self) -> None:
        self.llm.wake_up()


class VLLMServerEngine:
    """A `vllm serve` started with `--weight-transfer-config '{"backend":"nccl"}'
    --load-format dummy --logprobs-mode processed_logprobs --generation-config vllm
    --hf-overrides '{"head_dtype":"float32"}' --skip-tokenizer-init` and VLLM_SERVER_DEV_MODE=1
    (slurm/ starts it). Every trainer rank builds this; rank 0 sends and talks to the server."""

    def __init__(self, base_url: str, trainer_address: str, port: int, timeout_s: float = 600):
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self.trainer_address, self.port = trainer_address, port
        self._transfer: _Transfer | None = None

    def _call(self, route: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + route, data=data, headers={"Content-Type": "application/json"},
            method="GET" if data is None else "POST",
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
            return json.loads(reply.read() or b"null")

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        results = []
        for prompt in prompts:
            body = vllm_sampling_kwargs(params)
            del body["detokenize"]
            body.update(prompt=list(prompt), return_token_ids=True, model=self._model_id)
            reply = self._call("/v1/completions", body)
            results.append([_response_from_json(choice) for choice in reply["choices"]])
        return results

    @cached_property
    def _model_id(self) -> str:
        return str(self._call("/v1/models")["data"][0]["id"])

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        if self._transfer is None:
            from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            workers = int(self._call("/get_world_size?include_dp=true")["world_size"])
            self._transfer = _Transfer(
                NCCLTrainerInitInfo(master_address=self.trainer_address, master_port=self.port,
                                    world_size=1 + workers, rank=_rank()),
                HTTPVLLMWeightSyncClient(self.base_url),
            )  # fmt: skip
        if _rank() == 0:
            self._call("/pause?mode=wait", {})
        nbytes = self._transfer.send(weights)
        if _rank() == 0:
            self._call("/reset_prefix_cache", {})
            self._call("/resume", {})
        return nbytes

    def sleep(self) -> None:
        """Disaggregated engines keep their GPUs."""

    def wake(self) -> None:
        """Disaggregated engines keep their GPUs."""


def _response_from_json(choice: dict[str, Any]) -> Response:
    tokens = list(choice["token_ids"])
    logprobs = list(choice["logprobs"]["token_logprobs"])
    if len(logprobs) != len(tokens):
        raise ValueError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
    return Response(tokens, logprobs, choice["finish_reason"])
