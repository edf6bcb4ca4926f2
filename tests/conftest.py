"""Shared fixtures: one pool of spawned gloo ranks per world size for the whole session, float64
as the default dtype for the modules that ask for it (exact math), and the `megatron-rpg`
command as a user runs it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_rpg.parallel import RankPool

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pool2():
    with RankPool(world_size=2) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool4():
    with RankPool(world_size=4) as pool:
        yield pool


@pytest.fixture(scope="session")
def cli():
    """cli(*args, timeout=600, env=None, cwd=ROOT) runs `megatron-rpg ARGS` in a fresh process
    (this interpreter) and returns its CompletedProcess, output captured as text."""

    def run(*args, timeout=600, env=None, cwd=ROOT):
        command = [sys.executable, "-m", "megatron_rpg.cli", *map(str, args)]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
        )

    return run


@pytest.fixture(scope="module")
def float64_by_default():
    """Use with `pytestmark = pytest.mark.usefixtures("float64_by_default")`; restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
