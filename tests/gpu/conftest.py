"""One NCCL world of one process for the in-process GPU tests, under the environment a launcher
(srun, torchrun) gives: RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address."""

import os

import pytest
import torch


@pytest.fixture(scope="session")
def nccl_world():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megatron_rpg.parallel import init_process_group

    for key, value in dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533"
    ).items():
        os.environ.setdefault(key, value)
    init_process_group("nccl")
    yield


@pytest.fixture
def check(record_property):
    """check(value, bound): the figure and its bound for scripts/gpu_check.sh's table."""

    def record(value, bound):
        record_property("value", f"{value:.3g}" if isinstance(value, float) else value)
        record_property("bound", bound)

    return record
