"""slurm/common.sh with stub Slurm commands on PATH (no Slurm needed): the time left becomes the
trainer's stop_after_minutes, srun is asked for the job's cores per task and the container's
working directory (the pre-flight and the engine server run in the image too), and a run that
stopped early is requeued (one that finished is not)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = {
    "scontrol": """case "$1 $2" in
    "show hostnames") printf '%s\n' ${STUB_HOSTS:-node1} ;;
    "show node") echo "NodeName=$3 NodeAddr=127.0.0.${3#node}" ;;
    *) echo "scontrol $*" >>"$STUB_LOG" ;;
esac""",
    "squeue": 'echo "$STUB_TIME_LEFT"',
    "curl": 'exit "${STUB_CURL_EXIT:-7}"',  # 7: nothing listens, the engine never becomes healthy
    "srun": """echo "srun $*" >>"$STUB_LOG"
if [ -n "${STUB_STOP_EARLY:-}" ]; then echo "step 3: a signal" >"$MRPG_STOPPED_EARLY_FILE"; fi
if [ -n "${STUB_SRUN_RUNS:-}" ]; then while [[ $1 == --* ]]; do shift; done; exec "$@"; fi""",
}


def common_sh(tmp_path, script, batch_script=None, **env):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    environment = {
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NTASKS": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "MRPG_PYTHON": "python3",
        "STUB_LOG": str(tmp_path / "calls.log"),
        "STUB_TIME_LEFT": "UNLIMITED",
        **env,
    }
    command = ["bash", "-c", f'source "{ROOT}/slurm/common.sh"; {script}']
    return subprocess.run(
        [batch_script] if batch_script else command,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("left", "minutes"),
    [
        ("1-02:03:04", (86400 + 2 * 3600 + 3 * 60 + 4) // 60 - 3),
        ("45:00", 42),
        ("2:10:00", 127),
        ("UNLIMITED", 0),
        ("0:30", 1),
        ("", 0),
    ],
)
def test_time_left_becomes_stop_after_minutes(tmp_path, left, minutes):
    done = common_sh(tmp_path, "mrpg_minutes_left", STUB_TIME_LEFT=left)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(minutes)


def test_srun_gets_cores_per_task_and_the_container_workdir(tmp_path):
    done = common_sh(
        tmp_path,
        "mrpg_run echo trained",
        SLURM_CPUS_PER_TASK="12",
        MRPG_CONTAINER_IMAGE="nvcr.io/x:1",
        MRPG_CONTAINER_MOUNTS="/lustre:/lustre",
    )
    assert done.returncode == 0, done.stderr
    call = (tmp_path / "calls.log").read_text()  # one srun; its bash -c script spans lines
    assert call.count("srun ") == 1
    assert call.startswith("srun --kill-on-bad-exit=1 --label --cpus-per-task=12 ")
    for flag in (
        "--container-image=nvcr.io/x:1",
        f"--container-workdir={tmp_path}",
        "--container-mounts=/lustre:/lustre",
    ):
        assert flag in call.split(), call
    assert "requeue" not in (tmp_path / "calls.log").read_text()  # finished: not requeued


def test_a_run_that_stopped_early_is_requeued(tmp_path):
    done = common_sh(tmp_path, "mrpg_run echo trained; echo not reached", STUB_STOP_EARLY="1")
    assert done.returncode == 0, done.stderr
    assert "stopped at step 3: a signal; requeueing" in done.stdout
    assert "not reached" not in done.stdout
    assert "scontrol requeue 7" in (tmp_path / "calls.log").read_text()
    assert not (tmp_path / ".mrpg" / "stopped-7").exists()  # the next run starts clean


def test_an_engine_server_that_dies_at_start_ends_the_job_at_once(tmp_path):
    """mrpg_serve watches the server's srun step while it waits for /health (30 minutes)."""
    model = tmp_path / "hf"
    model.mkdir()
    serve = f"mrpg_serve 1 {ROOT / 'examples' / 'tiny_cpu.yaml'} rollout.tensor_parallel=1"
    missing = common_sh(tmp_path, serve, MRPG_ENGINE_MODEL=str(model))
    assert missing.returncode != 0 and "no config.json there" in missing.stderr
    (model / "config.json").write_text("{}")
    done = common_sh(tmp_path, serve, MRPG_ENGINE_MODEL=str(model), SLURM_CPUS_ON_NODE="64")
    assert done.returncode != 0
    assert "exited before it was healthy" in done.stderr
    call = (tmp_path / "calls.log").read_text().split()
    assert "--cpus-per-task=64" in call
    # the config is the one source of the engine's settings; the cluster address, not 0.0.0.0
    assert call[call.index("--config") + 1].endswith("tiny_cpu.yaml")
    assert call[call.index("--set") + 1] == "rollout.tensor_parallel=1"
    assert call[call.index("--host") + 1] == "127.0.0.1"


def test_two_engine_nodes_get_a_server_each_and_the_trainer_all_their_urls(tmp_path):
    """rollout.engine_nodes=2: a `vllm serve` on each of the job's last two nodes, bound to its
    own address (and port: emulated nodes share one); MRPG_ENGINE_URL lists both once both are
    healthy."""
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    serve = f'mrpg_serve 2 {ROOT / "examples" / "tiny_cpu.yaml"} && echo "$MRPG_ENGINE_URL"'
    hosts = {"STUB_HOSTS": "node1 node2 node3", "SLURM_JOB_NODELIST": "node[1-3]"}
    done = common_sh(tmp_path, serve, MRPG_ENGINE_MODEL=str(model), STUB_CURL_EXIT="0", **hosts)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "http://127.0.0.2:8000,http://127.0.0.3:8001"
    assert "vllm serve on node3 is healthy at http://127.0.0.3:8001" in done.stdout
    steps = (tmp_path / "calls.log").read_text().splitlines()
    servers = [line.split() for line in steps if "megatron_rpg.rollout.vllm_server" in line]
    assert [(s[s.index("--host") + 1], s[3]) for s in servers] == [
        ("127.0.0.2", "--nodelist=node2"),
        ("127.0.0.3", "--nodelist=node3"),
    ]


def test_the_conversion_job_runs_on_tp_x_pp_tasks(tmp_path):
    """slurm/convert.sh: hf-to-mcore on exactly TP x PP tasks, refused when the job is smaller."""
    shutil.copytree(ROOT / "slurm", tmp_path / "slurm")  # a batch script sources the submit dir's
    script = str(tmp_path / "slurm" / "convert.sh")
    common = {"HF": "/lustre/hf/l70", "OUT": "/lustre/ckpt/l70", "SLURM_CPUS_PER_TASK": "12"}
    small = common_sh(tmp_path, "", script, SLURM_NTASKS="8", **common)
    assert small.returncode == 2 and "needs 32 tasks; the job has 8" in small.stderr
    done = common_sh(tmp_path, "", script, SLURM_NTASKS="32", VERIFY="1", **common)
    assert done.returncode == 0, done.stderr
    call = (tmp_path / "calls.log").read_text().split()
    assert "--ntasks=32" in call and "--cpus-per-task=12" in call
    tail = "convert hf-to-mcore --hf /lustre/hf/l70 --out /lustre/ckpt/l70 --tp 8 --pp 4 --verify"
    assert " ".join(call).endswith(tail)


@pytest.mark.slow
def test_a_recipe_run_goes_under_the_output_root_one_directory_per_experiment(tmp_path):
    """mrpg_train: logging.run_dir = MRPG_OUTPUT_ROOT/<job name>-<job id> (the same across
    requeues), or MRPG_EXPERIMENT; an explicit logging.run_dir argument wins."""
    shutil.copytree(ROOT / "slurm", tmp_path / "slurm")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {
        "CKPT": str(tmp_path),
        "MRPG_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "SLURM_JOB_NAME": "rpg-7b",
        "SLURM_JOB_NUM_NODES": "1",
        "MRPG_OUTPUT_ROOT": "/lustre/runs",
        "STUB_TIME_LEFT": "10:00",
    }
    hf = f"model.hf_config={ROOT / 'examples' / 'models' / 'qwen2.5-7b'}"
    no_data = common_sh(tmp_path, f"mrpg_train examples/rpg_7b.yaml {hf}", **env)
    assert no_data.returncode != 0  # the pre-flight checks the inputs before the job trains
    assert "data.train_path" in no_data.stderr and not (tmp_path / "calls.log").exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dapo_math_17k_en.jsonl").write_text("")
    done = common_sh(tmp_path, f"mrpg_train examples/rpg_7b.yaml {hf}", **env)
    assert done.returncode == 0, done.stderr
    call = (tmp_path / "calls.log").read_text()
    assert "logging.run_dir=/lustre/runs/rpg-7b-7 " in call
    assert call.rstrip().endswith("checkpoint.stop_after_minutes=7")
    (tmp_path / "calls.log").unlink()
    named = common_sh(
        tmp_path,
        f"mrpg_train examples/rpg_7b.yaml {hf} logging.run_dir=/mine",
        MRPG_EXPERIMENT="ablation",
        **env,
    )
    assert named.returncode == 0, named.stderr
    words = (tmp_path / "calls.log").read_text().split()
    assert words.index("logging.run_dir=/lustre/runs/ablation") < words.index(
        "logging.run_dir=/mine"
    )  # the later one wins (load_config)


def test_in_a_container_the_pre_flight_and_the_server_run_in_the_image(tmp_path):
    """With MRPG_CONTAINER_IMAGE the batch shell's own Python (a config value, the plan) runs in
    a one-task step in the image, as the engine server does: the host needs no Python."""
    image = {"MRPG_CONTAINER_IMAGE": "nvcr.io/x:1", "PYTHONPATH": str(ROOT)}
    value = f"mrpg_config_value {ROOT / 'examples' / 'tiny_cpu.yaml'} rollout.n rollout.n=4"
    done = common_sh(tmp_path, value, STUB_SRUN_RUNS="1", MRPG_PYTHON=sys.executable, **image)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
    call = (tmp_path / "calls.log").read_text()
    assert call.startswith(
        f"srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 --container-image=nvcr.io/x:1 "
        f"--container-workdir={tmp_path} {sys.executable} -c "
    ), call
    (tmp_path / "calls.log").unlink()
    host = common_sh(tmp_path, value, MRPG_PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    assert host.stdout.strip() == "4" and not (tmp_path / "calls.log").exists()  # no step
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    serve = f"mrpg_serve 1 {ROOT / 'examples' / 'tiny_cpu.yaml'}"
    common_sh(tmp_path, serve, MRPG_ENGINE_MODEL=str(model), **image)
    server = (tmp_path / "calls.log").read_text().split()
    assert "--container-image=nvcr.io/x:1" in server and "python3" in server  # the image's


def test_one_variable_names_the_network_for_nccl_and_gloo(tmp_path):
    show = 'echo "nccl=${NCCL_SOCKET_IFNAME-unset} gloo=${GLOO_SOCKET_IFNAME-unset}"'
    done = common_sh(tmp_path, show, MRPG_SOCKET_IFNAME="ib0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["nccl=ib0", "gloo=ib0"]
    unset = common_sh(tmp_path, show)  # unset: both backends choose, as without the variable
    assert unset.stdout.split() == ["nccl=unset", "gloo=unset"]
