"""A `vllm serve` subprocess for tests (megatron_rpg/rollout/vllm_server.py's flags), killed with
its whole process group on exit."""

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from megatron_rpg.parallel import free_port
from megatron_rpg.rollout.vllm_server import server_command, server_environment, wait_until_healthy


def model_dir(parent, hf_config, state_dict=None):
    """A new directory under `parent` with config.json (and the weights as safetensors)."""
    directory = Path(tempfile.mkdtemp(prefix="vllm_model_", dir=parent))
    (directory / "config.json").write_text(json.dumps(hf_config))
    if state_dict is not None:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, directory / "model.safetensors"
        )
    return directory


@contextlib.contextmanager
def running_servers(
    directory,
    count,
    tensor_parallel=1,
    load_format="dummy",
    max_model_len=64,
    dtype="float32",
    log=None,
    api_key=None,
):
    """Yield [(url, process)] of `count` servers, started together, once all are healthy
    (requiring `api_key` if given); kill their process groups afterwards."""
    out = open(log or os.devnull, "w")  # noqa: SIM115
    servers = []
    try:
        for _ in range(count):
            port = free_port()
            command = server_command(
                directory,
                port,
                tensor_parallel,
                dtype=dtype,
                host="127.0.0.1",
                max_model_len=max_model_len,
                load_format=load_format,
            )
            process = subprocess.Popen(
                command,
                env=server_environment(kv_cache_gb=1, threads=1, api_key=api_key),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            servers.append((f"http://127.0.0.1:{port}", process))
        for url, process in servers:
            wait_until_healthy(url, 300 * count, process)
        yield servers
    finally:
        for _, process in servers:
            kill(process)
        out.close()


@contextlib.contextmanager
def running_server(directory, tensor_parallel=1, **options):
    """Yield (url, process) of one healthy server (running_servers' options)."""
    with running_servers(directory, 1, tensor_parallel, **options) as servers:
        yield servers[0]


def finished_requests(url):
    """Sequences the server has finished (vLLM's request_success_total over all reasons)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{")
    )


def kill(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
