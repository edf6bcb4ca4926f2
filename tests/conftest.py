"""Shared fixtures: one pool of spawned gloo ranks per world size for the whole session."""

import pytest

from megatron_rpg.parallel import RankPool


@pytest.fixture(scope="session")
def pool2():
    with RankPool(world_size=2) as pool:
        yield pool


@pytest.fixture(scope="session")
def pool4():
    with RankPool(world_size=4) as pool:
        yield pool
