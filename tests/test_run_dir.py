"""One run per run directory: a fresh run never lands on an old run's data, a second writer is
refused, and the command says so in one line before starting any rank."""

import os

import pytest

from megatron_rpg.config import ConfigError
from megatron_rpg.run.run_dir import claim_run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def holding_a_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "eval_before").mkdir()
    return run


def test_a_fresh_run_is_refused_a_directory_that_holds_a_run(tmp_path):
    run = holding_a_run(tmp_path)
    with pytest.raises(
        ConfigError, match=r"holds metrics.jsonl, checkpoints.*--resume.*--overwrite"
    ):
        claim_run_dir(run, resume=False, overwrite=False)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    claim_run_dir(run, resume=True, overwrite=False).close()
    assert (run / "checkpoints" / "step_00000002").is_dir()
    with pytest.raises(ConfigError, match="not with --resume"):
        claim_run_dir(run, resume=True, overwrite=True)
    claim_run_dir(run, resume=False, overwrite=True).close()
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert (run / "eval_before").is_dir()  # not the run's: kept
    claim_run_dir(tmp_path / "new" / "run", resume=False, overwrite=False).close()


def test_a_second_writer_is_refused_with_the_owner_named(tmp_path):
    lock = claim_run_dir(tmp_path, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match=rf"pid {os.getpid()} on .* is"):
        claim_run_dir(tmp_path, resume=True, overwrite=False)
    lock.close()  # the run ends (or dies: the kernel drops the lock)
    claim_run_dir(tmp_path, resume=True, overwrite=False).close()


def test_train_refuses_in_one_line_before_spawning_ranks(tmp_path, cli):
    run = holding_a_run(tmp_path)
    config = os.path.join(ROOT, "examples", "tiny_cpu.yaml")
    done = cli("train", "--config", config, f"logging.run_dir={run}", timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--overwrite replaces it" in done.stderr


def test_a_resumed_run_keeps_its_wandb_run_id(tmp_path):
    """logging.wandb_project: a requeued job's wandb.init gets the id of the run directory's
    first start (resume='allow' alone made a new wandb run per requeue)."""
    from megatron_rpg.run.metrics import wandb_run_id

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = wandb_run_id(tmp_path / "a")
    assert len(first) == 12 and wandb_run_id(tmp_path / "a") == first  # the requeued start
    assert wandb_run_id(tmp_path / "b") != first
