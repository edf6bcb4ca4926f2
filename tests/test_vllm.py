"""vLLM (the CPU build) as the rollout engine: weight sync from a TP2 x PP2 policy into colocated
engines (external_launcher, engine TP 1 and 2: full tensors, or each rank's own shards) and into
`vllm serve`s (TP 1 and 2, from every trainer rank), training
runs that learn (colocated; the server samples what colocated engines do), a bf16 engine against
the fp32 trainer, and a server that dies mid-run."""

import time
import urllib.error
import urllib.request
from functools import partial

import pytest
from rollout_cases import PROMPTS, colocated_engine, delta_syncs, server_engine, sync_after_step
from servers import finished_requests, kill, model_dir, running_server, running_servers
from test_trainer import CONFIG, ROOT, metrics, train

from megatron_rpg.config import load_config
from megatron_rpg.models import ModelArch
from megatron_rpg.parallel import RankPool
from megatron_rpg.rollout.placement import rollout_placement

from hf_cases import VLLM_FAMILIES, hf_model

pytestmark = pytest.mark.slow  # minutes: left out of the quick run, pytest -m "not slow"

TINY_MODEL = ROOT / "examples" / "tiny_model"
# a longer warm-up than the default run's (reward about 0.7 after it), then RL past 0.8
LEARNS = [
    "eval_interval=0",
    "checkpoint.save_interval=0",
    "rollout.engine=vllm",
    "sft.steps=100",
    "train_steps=160",
]


@pytest.fixture(scope="module")
def pool4():
    """Ranks of their own: vLLM leaves process-wide settings behind (threads, NUMA binding)."""
    with RankPool(world_size=4, timeout_s=600) as pool:
        yield pool


def shard_bytes(name, tp):
    """The fp32 bytes of one TP shard of the HF model: the projections split in tp, the norms
    and the vocabulary tensors whole."""
    parameters = hf_model(name, families=VLLM_FAMILIES).named_parameters()  # tied ones once
    return sum(
        t.numel() * 4 // (tp if k.endswith(("proj.weight", "proj.bias")) else 1)
        for k, t in parameters
    )


def check_sync(results, name, sharded_tp=1, served=False):
    """Log-probs equal the trainer's after the sync (fp32: 1e-4), not before; every sync hands
    each colocated engine the HF model's bytes, or its TP shard's (`sharded_tp`); served, the
    four ranks (TP2 x PP2) together send the model once (with Megatron's padded vocabulary
    rows), each about a quarter. Returns every prompt's responses."""
    last_stage = [r for r in results if r["before"] is not None]
    assert len(last_stage) == 2
    for r in last_stage:
        assert r["before"] > 1e-3  # the engine still has the old weights
        assert r["after"] < 1e-4
    if not served:
        hf_bytes = shard_bytes(name, sharded_tp)
        assert all(r["bytes"] == (hf_bytes, hf_bytes) for r in results)
    else:
        config = VLLM_FAMILIES[name]
        vocab, hidden = config["vocab_size"], config["hidden_size"]
        tables = 1 if config.get("tie_word_embeddings") else 2
        padding = (-(-vocab // 128) * 128 - vocab) * hidden * 4 * tables  # Megatron's, TP2
        sent = [r["bytes"][0] for r in results]
        assert [r["bytes"][1] for r in results] == sent
        assert sum(sent) == shard_bytes(name, 1) + padding
        assert max(sent) < 0.4 * sum(sent)  # no funnel: a quarter each, give or take a norm
    return last_stage[0]["responses"]


@pytest.mark.parametrize(("name", "engine_tp"), [("llama", 1), ("llama", 2), ("qwen2", 2)])
def test_colocated_weight_sync_from_tp2_pp2_sharded_where_the_tp_layouts_match(
    pool4, tmp_path, name, engine_tp
):
    """4 ranks: TP1 gives 4 engines, TP2 two; each samples its share of the prompts. An engine
    of TP2 receives each rank's own shards (no all-gather: tp_shards, the QKV bias included):
    half the projections' bytes."""
    directory = model_dir(tmp_path, VLLM_FAMILIES[name])
    make = partial(colocated_engine, model_dir=directory, tensor_parallel=engine_tp)
    state = hf_model(name, families=VLLM_FAMILIES).state_dict()
    results = pool4.run(sync_after_step, name, state, 2, 2, make, VLLM_FAMILIES)
    check_sync(results, name, sharded_tp=engine_tp)


@pytest.mark.parametrize(
    ("name", "engine_tp", "servers"), [("llama", 1, 2), ("qwen2", 2, 1)], ids=str
)
def test_served_weight_sync_sharded_from_every_tp2_pp2_rank(
    pool4, tmp_path, name, engine_tp, servers
):
    """One server of TP2, or two servers (as two engine nodes) that share the prompts: every
    trainer rank sends its own shards straight to every worker (own_shards, a group per
    source), and together they sample what the colocated engines do."""
    state = hf_model(name, families=VLLM_FAMILIES).state_dict()
    directory = model_dir(tmp_path, VLLM_FAMILIES[name])
    with running_servers(directory, servers, engine_tp) as running:
        urls = ",".join(url for url, _ in running)
        make = partial(server_engine, url=urls)
        responses = check_sync(
            pool4.run(sync_after_step, name, state, 2, 2, make, VLLM_FAMILIES), name, served=True
        )
        # prompt p on server p mod S; three rollouts of n = 2 each
        shares = [len(PROMPTS[k :: len(running)]) for k in range(len(running))]
        assert [finished_requests(url) for url, _ in running] == [3 * 2 * m for m in shares]
    if name == "llama":  # same seeds, same weights: the servers sample what colocated engines do
        make = partial(colocated_engine, model_dir=directory, tensor_parallel=1)
        assert responses == check_sync(
            pool4.run(sync_after_step, name, state, 2, 2, make, VLLM_FAMILIES), name
        )


def test_served_delta_sync_checksums_resync_and_a_full_sync_every_third(pool4, tmp_path):
    """Two servers, full_sync_every=3, from TP2 x PP2 (rollout_cases.delta_syncs): a delta
    of a tenth of the elements costs a fifth of the bytes (index and value) and gives the
    trainer's log-probs; a weight the engine missed fails the checksum and everything is sent
    again (then the log-probs agree); every third sync is full."""
    name = "llama"
    state = hf_model(name, families=VLLM_FAMILIES).state_dict()
    directory = model_dir(tmp_path, VLLM_FAMILIES[name])
    with running_servers(directory, 2, 1) as running:
        urls = ",".join(url for url, _ in running)
        make = partial(server_engine, url=urls, full_sync_every=3)
        results = pool4.run(delta_syncs, name, state, 2, 2, make, VLLM_FAMILIES)
    for r in results:
        kinds, sent = zip(*r["history"], strict=True)
        assert kinds == ("full", "delta", "resync", "delta", "delta", "full")
        assert sent[5] == sent[0] > 0  # a full sync: this rank's shards
        assert sent[2] > sent[0]  # the failed delta, then everything again
        assert 0.15 * sent[0] < sent[1] < 0.25 * sent[0]  # 10% of the elements, 8 bytes each
        assert sent[3] == sent[4] < 200  # nothing changed: a count per bucket
    last_stage = [r for r in results if r["after_delta"] is not None]
    assert len(last_stage) == 2
    assert all(r["after_delta"] < 1e-4 and r["after_resync"] < 1e-4 for r in last_stage), [
        (r["after_delta"], r["after_resync"]) for r in last_stage
    ]


def test_placement_refusals_name_the_key():
    arch = ModelArch.from_hf(VLLM_FAMILIES["llama"])  # 4 heads, 2 KV heads
    cases = [
        (["rollout.engine=vllm", "rollout.tensor_parallel=3"], 4, "rollout.tensor_parallel"),
        (["rollout.engine=vllm", "rollout.tensor_parallel=4"], 6, "trainer's 6 ranks"),
        (["rollout.engine=vllm", "rollout.weight_transfer=nccl"], 4, "mrpg_local"),
        (
            ["rollout.engine=vllm", "rollout.server_url=http://x", "rollout.weight_transfer=nccl"],
            4,
            "without CUDA",
        ),
        (["rollout.tensor_parallel=2"], 4, "rollout.engine=embedded"),
        (["rollout.engine=vllm", "rollout.full_sync_every=3"], 4, "colocated"),
        (["rollout.full_sync_every=3"], 4, "rollout.engine=embedded"),
    ]
    for overrides, ranks, message in cases:
        with pytest.raises(ValueError, match=message):
            rollout_placement(load_config(CONFIG, overrides).rollout, arch, ranks, cuda=False)
    colocated = rollout_placement(load_config(CONFIG, cases[0][0][:1]).rollout, arch, 4, cuda=False)
    assert (colocated.engines, colocated.transfer) == (4, "mrpg_local")


def assert_learned(run_dir, steps=20):
    """The mean reward of the last `steps` steps is >= 0.8 and above that of the first."""
    rewards = [m["reward/mean"] for m in metrics(run_dir)]
    first, last = sum(rewards[:steps]) / steps, sum(rewards[-steps:]) / steps
    assert last >= 0.8 and last > first + 0.05, (first, last)


def test_colocated_bf16_engine_learns_and_truncated_is_corrects(tmp_path):
    """One rank, a bf16 engine against the fp32 trainer: the mismatch shows in the metrics and
    in the importance weights, and the policy still learns."""
    run_dir = tmp_path / "bf16"
    done = train(
        *LEARNS, "rollout.dtype=bfloat16", "loss.rollout_is=token", f"logging.run_dir={run_dir}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_learned(run_dir)
    records = metrics(run_dir)
    assert min(r["rollout/abs_gap_max"] for r in records) > 1e-4  # bf16 vs fp32
    assert all(r["rollout/kl_k3"] > 0 for r in records)
    assert max(abs(r["rollout/is_weight_mean"] - 1) for r in records) > 1e-4


def test_colocated_tp2_dp2_learns_with_sharded_weight_sync(tmp_path):
    """4 ranks (trainer TP2 x DP2), two vLLM engines of TP2 (each half of the prompts), each
    rank handing its own shards over at every sync (tp_shards at PP1: views of its
    parameters), fp32: engine = trainer at every step. (Engines of TP1 in a 4-rank world, full
    tensors: the sync tests above.)"""
    run_dir = tmp_path / "tp2dp2"
    done = train(
        "--nproc",
        "4",
        *LEARNS,
        "parallel.tensor_parallel=2",
        "rollout.tensor_parallel=2",
        "optimizer.micro_batch_size=32",
        f"logging.run_dir={run_dir}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_learned(run_dir)
    assert max(r["rollout/abs_gap_max"] for r in metrics(run_dir)) < 1e-4


def test_a_server_that_dies_mid_run_stops_the_run_at_once_naming_it(tmp_path):
    """A `vllm serve` subprocess requiring the job's key; killed mid-run, the trainer stops
    within seconds naming it (bounded retries, no rank left in a collective) with its
    checkpoints complete. (Resuming against a new server: tests/test_slurm.py, slurm/rpg_70b.sh
    preempted; that the server samples what the colocated engines, which learn, sample: above.)"""
    run_dir = tmp_path / "server"
    common = [
        "eval_interval=0",
        "rollout.engine=vllm",
        "sft.steps=30",
        "train_steps=160",
        "checkpoint.save_interval=4",
        "rollout.request_timeout_s=10",
        "rollout.request_retries=1",
        f"logging.run_dir={run_dir}",
    ]
    key = {"MRPG_ENGINE_API_KEY": "this-job"}  # as slurm/common.sh makes one per job
    with running_server(TINY_MODEL, max_model_len=32, api_key="this-job") as (url, server):
        with pytest.raises(urllib.error.HTTPError) as refused:  # a client without the key
            urllib.request.urlopen(url + "/v1/models", timeout=30)
        assert refused.value.code == 401
        process = train(*common, f"rollout.server_url={url}", env=key, popen=True)
        log = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 10:
                break
            time.sleep(0.2)
        kill(server)
        killed = time.monotonic()
        output, _ = process.communicate(timeout=120)
    assert time.monotonic() - killed < 60  # retries and timeouts bound it, not the collective's
    assert process.returncode != 0
    assert f"vllm serve at {url}" in output, output[-3000:]
    assert [m["step"] for m in metrics(run_dir)][-1] >= 10
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(saved) >= 2 and all((s / "COMPLETE").is_file() for s in saved)
