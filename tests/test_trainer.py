"""The trainer end to end on the embedded task: short runs on TP=2 and on TP=1 x DP=2 gloo
ranks, exact resume after a kill, a corrupt checkpoint skipped, a non-finite step skipped, bad
configs refused before any work."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_cases import (
    dynamic_sampling_rollouts,
    non_finite_step_is_skipped,
    short_run,
    signal_during_step_3,
    whiten_halves,
)

from megatron_rpg.checkpoint.train_state import verify

pytestmark = pytest.mark.slow  # minutes: left out of the quick run, pytest -m "not slow"

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_cpu.yaml"
# a warm-up long enough that the rewards differ within groups: every step's update moves the
# weights and Adam's moments, so that a resume which lost either shows (test_every_step_learns)
TINY = [
    f"model.hf_config={ROOT / 'examples' / 'tiny_model'}",
    "train_steps=6",
    "sft.steps=30",
    "data.prompts_per_step=4",
    "rollout.n=4",
    "optimizer.mini_batch_size=8",
    "optimizer.micro_batch_size=4",
    "checkpoint.save_interval=2",
    "eval_interval=3",
]
TIMING = ("time/", "throughput/", "perf/")
EVERY_STEP = [
    "reward/mean",
    "kl/k3",
    "entropy/mean",
    "clip/upper",
    "clip/lower",
    "clip/dual",
    "response/length_mean",
    "throughput/tokens_per_s",
    "rollout/abs_gap_mean",
    "rollout/kl_k3",
    "loss",
    "grad_norm",
    "lr",
    "skipped_steps",
    "time/rollout",
    "time/logprobs",
    "time/update",
    "time/sync",
]


def train(*args, env=None, **popen):
    command = [sys.executable, "-m", "megatron_rpg.cli", "train", "--config", str(CONFIG), *args]
    env = {**os.environ, **(env or {})}
    if popen:
        return subprocess.Popen(
            command,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "whole"
    done = train(*TINY, f"logging.run_dir={run_dir}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir, done


def test_every_step_of_the_tiny_run_learns(uninterrupted):
    """The resume tests compare against this run: each of its steps must change the weights."""
    run_dir, _ = uninterrupted
    assert all(r["grad_norm"] > 0 for r in metrics(run_dir)), metrics(run_dir)


def test_short_runs_on_tp2_and_tp1_dp2_log_every_metric(pool2, tmp_path):
    runs = {}
    for name, layout in (
        ("tp2", "parallel.tensor_parallel=2"),
        ("dp2", "parallel.tensor_parallel=1"),
    ):
        run_dir = tmp_path / name
        results = pool2.run(short_run, str(CONFIG), [*TINY, layout, f"logging.run_dir={run_dir}"])
        runs[name] = results[0]
        assert len(results[0]) == 6
        for record in results[0]:
            missing = [k for k in EVERY_STEP if k not in record]
            assert not missing, missing
        assert [r.get("eval/accuracy") is not None for r in results[0]] == [False, False, True] * 2
        assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(metrics(run_dir)) == 6
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
            "step_00000004",
            "step_00000006",
        ]  # keep_last=2
    # one set of initial weights in both layouts: the first rollout is the same; the update is
    # the same math up to float summation order
    tp2, dp2 = runs["tp2"][0], runs["dp2"][0]
    assert tp2["reward/mean"] == dp2["reward/mean"]
    assert tp2["response/length_mean"] == dp2["response/length_mean"]
    assert abs(tp2["loss"] - dp2["loss"]) < 1e-5
    assert max(r["rollout/abs_gap_max"] for r in runs["tp2"]) < 1e-4  # engine == trainer


def test_sequence_parallel_gives_the_same_steps_at_tp2(uninterrupted, pool2, tmp_path):
    """The GPU recipes' branch: SP (micro-batches padded to a multiple of TP) on and off, under
    Transformer Engine's spec (its CPU stand-ins), from the same weights (the whole run's step-4
    checkpoint, saved under the local spec at TP1): the same step metrics within 1e-5."""
    start = uninterrupted[0] / "checkpoints" / "step_00000004"
    runs = {}
    for sp in ("false", "true"):
        overrides = [
            *TINY,
            "train_steps=2",
            "sft.steps=0",
            f"model.checkpoint={start}",
            "parallel.tensor_parallel=2",
            "model.layer_spec=te",
            "loss.kl_anchor=ref",  # the reference's log-probs under SP too
            f"parallel.sequence_parallel={sp}",
            f"logging.run_dir={tmp_path / sp}",
        ]
        runs[sp] = without_timing(pool2.run(short_run, str(CONFIG), overrides)[0])
    assert len(runs["true"]) == 2 and runs["true"][0].keys() == runs["false"][0].keys()
    gaps = {
        (step, key): abs(on[key] - off[key]) / max(1.0, abs(off[key]))
        for step, (on, off) in enumerate(zip(runs["true"], runs["false"], strict=True))
        for key in on
    }
    assert max(gaps.values()) < 1e-5, sorted(gaps.items(), key=lambda item: -item[1])[:5]
    assert all(r["grad_norm"] > 0 for r in runs["true"])


def test_te_spec_trains_at_tp2_pp2_with_sequence_parallel_and_logs_the_bubble(pool4, tmp_path):
    overrides = [
        *TINY,
        "train_steps=2",
        "parallel.tensor_parallel=2",
        "parallel.pipeline_parallel=2",
        "parallel.sequence_parallel=true",
        "model.layer_spec=te",
        f"logging.run_dir={tmp_path}",
    ]
    history = pool4.run(short_run, str(CONFIG), overrides)[0]
    assert len(history) == 2
    for record in history:
        assert 0.0 <= record["perf/pipeline_bubble"] < 1.0
        assert record["grad_norm"] > 0 and math.isfinite(record["loss"])


def test_killed_run_resumes_bit_identically(uninterrupted, tmp_path):
    whole, _ = uninterrupted
    run_dir = tmp_path / "killed"
    process = train(*TINY, f"logging.run_dir={run_dir}", popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        log = run_dir / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # between the checkpoints of steps 2 and 4
    process.wait()
    assert 3 <= len(metrics(run_dir)) < 6
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 9, "reward/me')  # a torn last line (a full disk, a kill mid-write)
    done = train(*TINY, f"logging.run_dir={run_dir}", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resume: continuing from" in done.stdout
    assert without_timing(metrics(run_dir)) == without_timing(metrics(whole))


def test_a_time_limit_saves_before_it_and_resumes_to_the_same_run(uninterrupted, tmp_path):
    """checkpoint.stop_after_minutes (Slurm's time left): after a step, when the next step and
    its save would end past the limit, the run checkpoints, tells the launcher (the file
    slurm/common.sh requeues on) and exits 0; resumed, it ends as the uninterrupted run."""
    whole, _ = uninterrupted
    run_dir, flag = tmp_path / "limited", tmp_path / "stopped"
    env = {"MRPG_STOPPED_EARLY_FILE": str(flag)}
    done = train(
        *TINY, f"logging.run_dir={run_dir}", "checkpoint.stop_after_minutes=0.0001", env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stopping on the time limit: checkpoint" in done.stdout
    assert flag.read_text() == "step 1: the time limit\n"  # one step always runs
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000001"]
    flag.unlink()
    done = train(*TINY, f"logging.run_dir={run_dir}", "--resume", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resume: continuing from" in done.stdout and not flag.exists()
    assert without_timing(metrics(run_dir)) == without_timing(metrics(whole))


@pytest.mark.parametrize(
    ("where", "abandoned"),
    [
        ("rollout", "in its rollout"),
        ("logprob pass", "in its log-probs, after 1 of its 2 mini-batches"),
        ("last logprob pass", "before its update"),
        ("update", "in its update, after 1 of its 2 optimizer steps"),
    ],
)
def test_a_signal_inside_a_step_abandons_it_and_resumes_to_the_same_run(
    pool2, tmp_path, where, abandoned
):
    """The signal is looked at during each step's rollout (most of a step), between its log-prob
    passes, before its update and between the update's optimizer steps, not only after the
    whole step: the step is abandoned with the state of its start (in the update: put back
    from the host copy), the checkpoint of the last whole step kept, and the resumed run
    repeats the abandoned step exactly (TP2, two ranks)."""
    # no periodic checkpoint: the one written at the stop holds the abandoned step's start
    overrides = [
        *TINY,
        "parallel.tensor_parallel=2",
        "train_steps=4",
        "checkpoint.save_interval=0",
    ]
    whole, stopped, resumed, printed = pool2.run(
        signal_during_step_3, str(CONFIG), overrides, str(tmp_path), where
    )[0]
    assert f"stopping on a signal (step 3 abandoned {abandoned}): checkpoint" in printed
    assert len(whole) == 4 and len(stopped) == 2 and len(resumed) == 2
    assert whole[2]["grad_norm"] > 0.1  # step 3 moves the weights: putting them back matters
    assert without_timing(stopped + resumed) == without_timing(whole)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000004",
    ]


def spawned_ranks(launcher_pid):
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        children = psutil.Process(launcher_pid).children()
        return [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    return []


def alive(process):
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_anywhere_resumes_bit_identically(uninterrupted, tmp_path):
    """The launcher or a rank, SIGKILL or SIGTERM, at random points of a run that checkpoints
    every step: no process outlives its launcher, a second writer is refused while one runs, and
    after the resumes the metrics are the uninterrupted run's."""
    import random

    whole, _ = uninterrupted
    run_dir = tmp_path / "killed_anywhere"
    args = [*TINY, "checkpoint.save_interval=1", f"logging.run_dir={run_dir}"]
    rng = random.Random(0)
    kills = [
        ("launcher", signal.SIGKILL),
        ("rank", signal.SIGTERM),
        ("launcher", signal.SIGTERM),
        ("rank", signal.SIGKILL),
    ]
    for attempt, (target, signum) in enumerate(kills):
        process = train(*args, *(["--resume"] if attempt else []), popen=True)
        deadline = time.monotonic() + rng.uniform(4.0, 16.0)
        ranks = []
        while attempt == 0 and not ranks and process.poll() is None:
            ranks = spawned_ranks(process.pid)
            time.sleep(0.05)
        if attempt == 0:  # the run is starting up: a second one is refused
            second = train(*args, "--resume")
            assert second.returncode == 2 and "no other run is writing" in second.stderr
        while time.monotonic() < deadline and process.poll() is None:
            ranks = spawned_ranks(process.pid) or ranks
            time.sleep(0.05)
        if process.poll() is None:
            victim = process.pid if target == "launcher" or not ranks else rng.choice(ranks).pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signum)
        process.communicate(timeout=300)
        gone = time.monotonic() + 10
        while any(alive(r) for r in ranks):
            assert time.monotonic() < gone, f"ranks outlived their launcher ({target}, {signum})"
            time.sleep(0.1)
    done = train(*args, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert without_timing(metrics(run_dir)) == without_timing(metrics(whole))


def test_a_bad_metrics_line_is_named_and_only_a_torn_last_one_dropped(tmp_path):
    from megatron_rpg.run.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a torn last line"):
        assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(path)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    import shutil

    whole, _ = uninterrupted
    run_dir = tmp_path / "corrupt"
    shutil.copytree(whole, run_dir)
    latest = run_dir / "checkpoints" / "step_00000006"
    victim = next(p for p in sorted((latest / "dist").iterdir()) if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert "does not match its sha256" in verify(latest)
    done = train(*TINY, f"logging.run_dir={run_dir}", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipping checkpoint" in done.stdout + done.stderr
    assert "continuing from" in done.stdout and "step_00000004 (step 4)" in done.stdout
    assert without_timing(metrics(run_dir)) == without_timing(metrics(whole))
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        (checkpoint / "COMPLETE").unlink()
    refused = train(*TINY, f"logging.run_dir={run_dir}", "--resume")
    assert refused.returncode != 0
    assert (
        "no usable checkpoint" in refused.stderr and "step_00000006: incomplete" in refused.stderr
    )
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before  # nothing overwritten


def test_resume_applies_allowed_changes_and_refuses_the_rest(uninterrupted, tmp_path):
    import shutil

    whole, _ = uninterrupted
    run_dir = tmp_path / "extended"
    shutil.copytree(whole, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    refused = train(*TINY, f"logging.run_dir={run_dir}", "parallel.tensor_parallel=2", "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "'parallel.tensor_parallel': got 2; allowed: 1 as saved in" in refused.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
    done = train(
        *TINY, f"logging.run_dir={run_dir}", "train_steps=8", "optimizer.lr=1e-3", "--resume"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resume: train_steps: 6 -> 8 (applied)" in done.stdout
    assert "resume: optimizer.lr: 0.0003 -> 0.001 (applied)" in done.stdout
    records = metrics(run_dir)
    assert without_timing(records[:6]) == without_timing(metrics(whole))
    assert [r["step"] for r in records[6:]] == [7, 8]
    assert records[5]["lr"] == pytest.approx(3e-4) and records[6]["lr"] == pytest.approx(1e-3)


def test_a_run_resumes_under_the_other_layer_spec_to_the_same_steps(uninterrupted, tmp_path):
    """Saved under Megatron's local spec, resumed under Transformer Engine's (its CPU stand-ins):
    the model, reference and optimizer state load by the same checkpoint keys, and the steps
    after the checkpoint are the whole run's."""
    import shutil

    whole, _ = uninterrupted
    run_dir = tmp_path / "respec"
    shutil.copytree(whole, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")  # resume from step 4
    done = train(*TINY, f"logging.run_dir={run_dir}", "model.layer_spec=te", "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resume: model.layer_spec: 'auto' -> 'te' (applied)" in done.stdout
    assert without_timing(metrics(run_dir)) == without_timing(metrics(whole))


def test_a_full_disk_is_named_and_leaves_no_partial_checkpoint(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("needs root to mount a 6 MiB tmpfs: a real full disk")
    try:
        run_dir = small / "run"  # room for the step-2 checkpoint (4.2 MiB), not for step 4's
        done = train(*TINY, f"logging.run_dir={run_dir}")
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert f"checkpoint {run_dir}/checkpoints/step_00000004 not written: No space left" in last
        assert "earlier checkpoints are intact" in last and "error.log" in last
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000002"]
        assert verify(run_dir / "checkpoints" / "step_00000002") is None
        assert "CheckpointWriteError" in (run_dir / "error.log").read_text()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_incomplete_checkpoint_is_not_used(tmp_path):
    checkpoint = tmp_path / "step_00000002"
    checkpoint.mkdir()
    assert verify(checkpoint) == "incomplete (no COMPLETE marker)"


def test_non_finite_step_is_skipped_not_applied(pool2, tmp_path):
    overrides = [
        *TINY,
        "parallel.tensor_parallel=2",
        f"logging.run_dir={tmp_path}",
        "sft.steps=30",
    ]  # some rewards are 1: the gradients are not all zero
    result = pool2.run(non_finite_step_is_skipped, str(CONFIG), overrides)[0]
    assert result == {"skipped": 2, "unchanged": True, "moved_after": True, "finite": True}


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.beta=-1", "loss.beta"),
        ("optimizer.mini_batch_size=48", "optimizer.mini_batch_size"),
        ("rollout.top_p=2", "rollout.top_p"),
        ("data.task=math", "data.train_path"),
        ("eval_benchmarks=aime23", "eval_benchmarks"),
        ("rollout.engine_nodes=1", "rollout.engine_nodes"),
        ("model.hf_config=/nonexistent", "model.hf_config"),
        ("data.train_path=/nonexistent.jsonl", "data.train_path"),
        ("optimizer.lr=.inf", "'optimizer.lr': got inf; allowed: a finite number"),
        ("loss.beta=[1", "'loss.beta': got '[1'; allowed: a YAML value"),
        ("parallel.tensor_parallel=2 --nproc=3", "'--nproc': got 3; allowed: a multiple of"),
        ("--config=/nonexistent.yaml", "'--config': got '/nonexistent.yaml'"),
    ],
)
def test_bad_config_stops_before_any_work(tmp_path, capsys, monkeypatch, override, message):
    """`megatron-rpg train` in this process (the refusal comes before any rank or import of
    the model code would start): exit status 2, one line naming the key and value."""
    from megatron_rpg.cli import main

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the checkout
    run_dir = tmp_path / "never"
    args = ["train", "--config", str(CONFIG), *TINY, f"logging.run_dir={run_dir}"]
    assert main([*args, *override.split()]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1, stderr
    assert not run_dir.exists()


def test_dynamic_sampling_keeps_groups_with_signal(pool2, tmp_path):
    overrides = [
        *TINY,
        "sft.steps=25",
        "algorithm.dynamic_sampling=true",
        "algorithm.dynamic_sampling_max_rounds=6",
        "data.prompts_per_step=6",
        "optimizer.mini_batch_size=24",
        f"logging.run_dir={tmp_path}",
    ]
    first, second = pool2.run(dynamic_sampling_rollouts, str(CONFIG), overrides)[0]
    for varied, metrics, _, _ in (first, second):
        assert len(varied) == 6
        dropped = metrics["dynamic/dropped_groups"]
        assert dropped > 0  # a partly trained model solves some prompts every time, others never
        if metrics["dynamic/rounds"] < 6:
            assert all(varied)  # the batch filled with informative groups
        assert 0 <= metrics["reward/sampled_mean"] <= 1
    assert second[2] > 12  # data position: more prompts than 2 steps x 6, resampled ones count


def test_overlong_shaping_in_the_reward(pool2, tmp_path):
    overrides = [
        *TINY,
        "sft.steps=0",
        "rollout.max_tokens=4",
        "algorithm.overlong_buffer=2",
        "algorithm.overlong_penalty=0.5",
        f"logging.run_dir={tmp_path}",
    ]
    first, _ = pool2.run(dynamic_sampling_rollouts, str(CONFIG), overrides)[0]
    rewards = first[3]
    # untrained: wrong answers (0) of 3 tokens (-0.25) or 4 (-0.5), or shorter (0)
    assert set(rewards) <= {0.0, -0.25, -0.5, 1.0, 0.75, 0.5}
    assert min(rewards) == -0.5


def test_math_task_trains_with_sandboxed_grading(pool2, tmp_path):
    """data.task=math: JSON lines problems in the DAPO prompt, a model tokenizer, math-verify in
    the grader pool. A random tiny model answers nothing right; the loop runs and logs."""
    import transformers

    from megatron_rpg.data import PROMPT_TEMPLATE
    from megatron_rpg.evaluation import DATA_DIR
    from megatron_rpg.tokenizer import train_sentencepiece

    source = DATA_DIR / "gsm8k_train.jsonl"
    lines = source.read_text().splitlines()[:40]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    texts = [PROMPT_TEMPLATE.format(problem=json.loads(x)["problem"]) for x in lines]
    tokenizer = train_sentencepiece(texts, tmp_path / "tokenizer.model", 300)
    model = tmp_path / "model"
    model.mkdir()
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ).to_dict()
    (model / "config.json").write_text(json.dumps(config))
    overrides = [
        *TINY,
        "data.task=math",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"model.hf_config={model}",
        f"model.tokenizer={tokenizer.path}",
        "rollout.max_tokens=8",
        "train_steps=2",
        "sft.steps=0",
        "eval_interval=2",
        "eval_benchmarks=gsm8k,amc23",
        "eval_k=2",
        "eval_limit=2",
        f"logging.run_dir={tmp_path / 'run'}",
    ]
    history = pool2.run(short_run, str(CONFIG), overrides)[0]
    assert len(history) == 2
    for record in history:
        assert 0.0 <= record["reward/mean"] <= 1.0
        assert record["grading_failures"] == 0.0
    # periodic validation on the benchmarks, through the rollout engine
    for name in ("gsm8k", "amc23"):
        assert 0.0 <= history[1][f"eval/{name}/mean@2"] <= history[1][f"eval/{name}/pass@2"] <= 1
    assert "eval/gsm8k/mean@2" not in history[0]
    # the training checkpoint is a model: evaluated as it is, or converted to HF, the same
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert (step / "dist" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    common = ["--benchmarks", "gsm8k", "--k", "2", "--limit", "2", "--max-tokens", "8"]
    for args in (
        ["eval", "--ckpt", step, *common, "--out", tmp_path / "from_step"],
        ["convert", "mcore-to-hf", "--ckpt", step / "dist", "--out", tmp_path / "hf"],  # quickstart
        ["eval", "--hf", tmp_path / "hf", *common, "--out", tmp_path / "from_hf"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "megatron_rpg.cli", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    results = [
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("from_step", "from_hf")
    ]
    assert results[0] == results[1] and results[0]["gsm8k"]["problems"] == 2


def test_reinforce_pp_whitens_over_the_step_in_any_layout(pool2, tmp_path):
    """REINFORCE++ token advantages are whitened over every micro-batch and data-parallel rank:
    TP2 (one DP rank) and TP1 x DP2 compute the same first update."""
    common = [
        *TINY,
        "sft.steps=30",
        "train_steps=2",
        "algorithm.loss=reinforce_pp",
        "algorithm.advantage=reinforce_pp",
        "loss.beta=0",
        "loss.kl_anchor=ref",
        "algorithm.kl_in_reward=0.05",
    ]
    runs = {}
    for name, layout in (
        ("tp2", "parallel.tensor_parallel=2"),
        ("dp2", "parallel.tensor_parallel=1"),
    ):
        overrides = [*common, layout, f"logging.run_dir={tmp_path / name}"]
        runs[name] = pool2.run(short_run, str(CONFIG), overrides)[0]
    tp2, dp2 = runs["tp2"][0], runs["dp2"][0]
    assert tp2["reward/mean"] == dp2["reward/mean"] and 0 < tp2["reward/mean"] < 1
    assert tp2["kl/k3"] < 1e-2  # the reference is the warmed-up policy (was 2.88: the random one)
    assert abs(tp2["loss"] - dp2["loss"]) < 1e-5
    # the warm-up's float summation order differs between the layouts; whitening per rank instead
    # of over the step would change the gradient by percents
    assert abs(tp2["grad_norm"] - dp2["grad_norm"]) < 1e-3 * tp2["grad_norm"]


def test_whitening_over_ranks_equals_whitening_the_whole(pool2):
    import torch

    from megatron_rpg.losses.advantages import whiten

    g = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) < 0.6
    halves = pool2.run(whiten_halves, values, mask)
    torch.testing.assert_close(torch.cat(halves), whiten(values, mask), atol=1e-12, rtol=0)


def test_the_reference_interval_counts_optimizer_steps_as_the_paper():
    """The paper's 'every K optimizer steps': 512 prompts x 16 in mini-batches of 512 sequences
    are 16 optimizer steps per RL step, so K = 32 renews the reference after every second step."""
    from megatron_rpg.config import load_config
    from megatron_rpg.step.reference import reference_update_due

    paper = Path(__file__).parents[1] / "examples" / "rpg_paper_qwen3_4b.yaml"
    config = load_config(paper, ["loss.kl_anchor=ref", "algorithm.ref_update_interval=32"])
    per_step = config.optimizer_steps_per_step()
    assert per_step == 16
    due = [reference_update_due(step * per_step, 32, 0.0, 0.0) for step in range(1, 7)]
    assert due == [False, True, False, True, False, True]
    assert not any(reference_update_due(step * per_step, 0, 0.5, 0.0) for step in range(1, 7))
    assert reference_update_due(16, 0, kl_average=0.5, kl_target=0.4)
