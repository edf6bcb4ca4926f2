"""The distributed runtime: rank pool, Megatron parallel state with the CPU shim, seeding."""

import os

import pytest
import torch

from megatron_rpg.config import ConfigError, ParallelConfig
from megatron_rpg.parallel import RankError

from megatron_tiny import train_tiny_gpt


def whoami(tag):
    import torch.distributed as dist

    return (tag, dist.get_rank(), dist.get_world_size(), int(os.environ["RANK"]))


def fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    return "fine"


def fail_while_peer_waits_in_collective():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise KeyError("rank one gave up")
    dist.all_reduce(torch.ones(1))  # never completes: rank 1 is not coming
    return "unreachable"


def unpicklable_result():
    return lambda: "a local function cannot be pickled"


def test_an_unpicklable_result_is_an_error_not_a_hang(pool2):
    with pytest.raises(RankError, match=r"(?s)rank [01] raised.*Can.t pickle local object"):
        pool2.run(unpicklable_result)


def test_results_come_back_in_rank_order(pool2):
    assert pool2.run(whoami, "x") == [("x", 0, 2, 0), ("x", 1, 2, 1)]


def test_a_rank_exception_is_reraised_with_its_traceback(pool2):
    with pytest.raises(RankError) as info:
        pool2.run(fail_on_rank_one)
    assert info.value.rank == 1
    assert "ValueError: boom on rank one" in info.value.remote_traceback
    assert "fail_on_rank_one" in info.value.remote_traceback
    assert pool2.run(whoami, "after")[1] == ("after", 1, 2, 1)  # the pool still serves


@pytest.mark.slow
def test_a_rank_stuck_in_a_collective_is_cleaned_up(pool2):
    with pytest.raises(RankError, match="rank one gave up"):
        pool2.run(fail_while_peer_waits_in_collective)
    assert pool2.run(whoami, "restarted") == [("restarted", 0, 2, 0), ("restarted", 1, 2, 1)]


def rng_streams_under_tp2():
    from megatron.core import tensor_parallel

    from megatron_rpg.parallel import initialize_model_parallel

    layout = initialize_model_parallel(ParallelConfig(tensor_parallel=2), seed=11)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():  # model-parallel-rng: one stream per TP rank
        model_parallel = torch.rand(4)
    with tracker.fork("data-parallel-rng"):
        data_parallel = torch.rand(4)
    default = torch.rand(4)
    return layout.tp_rank, model_parallel, data_parallel, default


def test_tensor_parallel_ranks_get_own_model_rng_and_shared_data_rng(pool2):
    (r0, mp0, dp0, d0), (r1, mp1, dp1, d1) = pool2.run(rng_streams_under_tp2)
    assert (r0, r1) == (0, 1)
    assert not torch.equal(mp0, mp1)
    assert torch.equal(dp0, dp1) and torch.equal(d0, d1)
    # Reproducible: the same seed gives the same streams again.
    (_, mp0_again, _, _), _ = pool2.run(rng_streams_under_tp2)
    assert torch.equal(mp0, mp0_again)


def layout_that_does_not_divide():
    from megatron_rpg.parallel import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(tensor_parallel=4), seed=0)


def test_a_layout_that_does_not_divide_the_world_is_refused(pool2):
    with pytest.raises(RankError, match=r"tensor_parallel=4 x pipeline_parallel=1.*world size 2"):
        pool2.run(layout_that_does_not_divide)
    assert issubclass(ConfigError, ValueError)


def test_megatron_training_through_the_shim_is_layout_invariant(pool2):
    """DDP + Megatron's optimizer + the no-pipelining schedule on gloo: DP=2 and TP=2 train the
    same model (TP does not change the initialization) to the same losses, within fp32 noise."""
    dp = pool2.run(train_tiny_gpt, 1, 1, 4)
    tp = pool2.run(train_tiny_gpt, 2, 1, 4)
    dp_losses, tp_losses = dp[0]["losses"], tp[0]["losses"]
    assert dp_losses[-1] < dp_losses[0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(dp_losses), torch.tensor(tp_losses), rtol=1e-5, atol=0)
    # Data-parallel replicas hold identical parameters after the steps (finalize_model_grads).
    assert dp[0]["digest"] == dp[1]["digest"]
    assert dp[1]["losses"] == dp_losses


def test_pipeline_parallel_trains_through_the_shim(pool2):
    out = pool2.run(train_tiny_gpt, 1, 2, 3)
    losses = out[0]["losses"]
    assert out[1]["losses"] == losses and losses[-1] < losses[0]
    assert {o["layout"].pp_rank for o in out} == {0, 1}


def gloo_threads():
    from pathlib import Path

    names = (comm.read_text() for comm in Path("/proc/self/task").glob("*/comm"))
    return sum(name.startswith(("gloo", "pt_gloo")) for name in names)


def groups_and_threads_after_training_in_layouts():
    """Train in three layouts, tearing down after each: the groups and their threads go too."""
    from torch.distributed import distributed_c10d

    from megatron_rpg.parallel import destroy_model_parallel

    threads_before = gloo_threads()
    for tp, pp in ((2, 1), (1, 2), (2, 1)):
        train_tiny_gpt(tp, pp, 1)
        created = len(distributed_c10d._world.pg_map)
        destroy_model_parallel()
    return created, len(distributed_c10d._world.pg_map), threads_before, gloo_threads()


def test_layouts_do_not_leak_process_groups_or_their_threads(pool2):
    """Megatron's destroy only drops references, and a model, DDP and RoPE's cache keep groups
    alive: each leaked gloo group keeps 3 threads that wake every few ms, and hundreds of test
    cases on one pool slowed the suite by a third."""
    for created, remaining, threads_before, threads_after in pool2.run(
        groups_and_threads_after_training_in_layouts
    ):
        assert created > 5 and remaining == 1  # only the default group is left
        assert threads_after == threads_before


def test_every_core_lends_the_machine_and_gives_it_back():
    import os

    import torch

    from megatron_rpg.parallel import every_core
    from megatron_rpg.parallel.spawn import threads_per_rank

    cores = len(os.sched_getaffinity(0))
    assert (threads_per_rank(1), threads_per_rank(cores), threads_per_rank(4 * cores)) == (
        cores,
        1,
        1,
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(RuntimeError, match="inside"), every_core():
            assert torch.get_num_threads() == len(os.sched_getaffinity(0))
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def work_until_terminated(pid_dir):
    """Like the trainer: SIGTERM asks for a clean stop (a checkpoint), then the function returns;
    a rank that is killed instead writes nothing more."""
    import signal
    import time
    from pathlib import Path

    import torch.distributed as dist

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    (Path(pid_dir) / f"rank{dist.get_rank()}").write_text(str(os.getpid()))
    while not stop:
        time.sleep(0.05)
    (Path(pid_dir) / f"stopped{dist.get_rank()}").write_text("")
    return "stopped"


@pytest.mark.slow
def test_ranks_of_a_killed_parent_die_with_it(tmp_path):
    """kill -9 of the process holding the pool (no atexit runs, its run-directory lock is gone):
    its ranks die at once instead of writing on as orphans beside the next run."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = (
        "import sys; sys.path.insert(0, sys.argv[2])\n"
        "from megatron_rpg.parallel import RankPool\n"
        "from test_parallel import work_until_terminated\n"
        "if __name__ == '__main__':\n"
        "    with RankPool(2) as pool:\n"
        "        pool.run(work_until_terminated, sys.argv[1])\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), os.path.dirname(__file__)]
    )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("rank*"))) < 2:
        assert time.monotonic() < deadline and parent.poll() is None, "ranks did not start"
        time.sleep(0.2)
    ranks = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*"))]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in ranks):
        assert time.monotonic() < deadline, "orphaned ranks kept running"
        time.sleep(0.1)
    assert not list(tmp_path.glob("stopped*"))  # killed, not asked to stop


def sleep_then_answer(seconds):
    import time

    time.sleep(seconds)
    return "done"


def die_without_a_result():
    os._exit(9)


@pytest.mark.slow
def test_a_function_may_outlast_the_collective_timeout_and_a_dead_rank_is_named():
    """timeout_s bounds collectives, not the function (a 30-minute default once killed every
    training run at 30 minutes); a rank that dies is reported, not waited for."""
    from megatron_rpg.parallel import RankPool

    with RankPool(1, timeout_s=2) as pool:
        assert pool.run(sleep_then_answer, 4) == ["done"]
        with pytest.raises(RankError, match=r"ranks \[0\] died without a result"):
            pool.run(die_without_a_result)
