"""A `vllm serve` subprocess for tests (megatron_rpg/rollout/vllm_server.py's flags), killed with
its whole process group on exit."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from megatron_rpg.rollout.vllm_server import server_command, server_environment, wait_until_healthy


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def running_server(
    directory,
    tensor_parallel=1,
    load_format="dummy",
    max_model_len=64,
    dtype="float32",
    log=None,
    api_key=None,
):
    """Yield (url, process) of a healthy server (requiring `api_key` if given); kill its process
    group afterwards."""
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
    out = open(log or os.devnull, "w")  # noqa: SIM115
    process = subprocess.Popen(
        command,
        env=server_environment(kv_cache_gb=1, threads=1, api_key=api_key),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 300, process)
        yield url, process
    finally:
        kill(process)
        out.close()


def kill(process):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
