"""Shared fixtures: one pool of spawned gloo ranks per world size for the whole session, and
float64 as the default dtype for the modules that ask for it (exact math)."""

import pytest
import torch

from megatron_rpg.parallel import RankPool


@pytest.fixture(scope="session")
def pool2():
    with RankPool(world_size=2) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool4():
    with RankPool(world_size=4) as pool:
        yield pool


@pytest.fixture(scope="module")
def float64_by_default():
    """Use with `pytestmark = pytest.mark.usefixtures("float64_by_default")`; restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
