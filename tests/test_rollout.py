"""Rollout engines: the engine contract (the embedded engine and a vLLM server, the CPU build),
sampling against exact enumeration, and live weight sync from a TP=2 x PP=2 policy."""

import contextlib
import math
import re
import threading
import time

import pytest
import torch
from rollout_cases import sync_after_step

from megatron_rpg.rollout import EmbeddedEngine, SamplingParams
from megatron_rpg.rollout.embedded import sample

from hf_cases import FAMILIES, VLLM_FAMILIES, hf_model

PROMPTS = [[5, 17, 3, 9], [1, 2], [44, 45, 46, 47, 48, 49]]


def embedded_engine(name):
    model = hf_model(name)
    engine = EmbeddedEngine(FAMILIES[name], max_batch_size=4)
    engine.update_weights(model.named_parameters())
    return engine, model, 1e-5


@contextlib.contextmanager
def vllm_server_engine(name, parent):
    """A `vllm serve` (CPU build) loading the HF model's weights; the engine talks to it."""
    from servers import model_dir, running_server

    from megatron_rpg.rollout.vllm_engine import VLLMServerEngine

    model = hf_model(name, families=VLLM_FAMILIES)
    directory = model_dir(parent, VLLM_FAMILIES[name], model.state_dict())
    with running_server(directory, load_format="auto") as (url, _):
        yield VLLMServerEngine(url, VLLM_FAMILIES[name], "mrpg_gloo"), model, 1e-4


@pytest.fixture(scope="module", params=["embedded", pytest.param("vllm", marks=pytest.mark.slow)])
def engine(request, tmp_path_factory):
    if request.param == "embedded":
        yield embedded_engine("llama")
        return
    with vllm_server_engine("llama", tmp_path_factory.mktemp("vllm")) as engine:
        yield engine


def reference_logprobs(model, prompt, response, temperature):
    tokens = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(tokens).logits[0, len(prompt) - 1 : -1].double()
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_those_of_the_sampling_distribution(engine, temperature):
    engine, model, tolerance = engine
    params = SamplingParams(n=3, temperature=temperature, max_tokens=8, seed=1)
    groups = engine.generate(PROMPTS, params)
    assert [len(g) for g in groups] == [3, 3, 3]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for response in group:
            assert len(response.token_ids) == len(response.logprobs) == 8
            assert response.finish_reason == "length"
            want = reference_logprobs(model, prompt, response.token_ids, temperature)
            got = torch.tensor(response.logprobs, dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=tolerance, rtol=0)
    # each response has its own seed (seed + p * n + i, as vLLM): alone in a batch of its own,
    # prompt 0 gives the same responses, whatever padding the mixed batch had
    alone = engine.generate([PROMPTS[0]], params)[0]
    assert [r.token_ids for r in alone] == [r.token_ids for r in groups[0]]


def test_same_seed_same_responses_and_samples_differ(engine):
    engine, _, _ = engine
    params = SamplingParams(n=4, max_tokens=10, seed=3)
    first, again = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [[r.token_ids for r in g] for g in first] == [[r.token_ids for r in g] for g in again]
    other = engine.generate(PROMPTS, SamplingParams(n=4, max_tokens=10, seed=4))
    assert [[r.token_ids for r in g] for g in first] != [[r.token_ids for r in g] for g in other]
    assert len({tuple(r.token_ids) for r in first[0]}) > 1  # n samples are not copies


def test_stop_tokens_and_max_tokens(engine):
    engine, _, _ = engine
    free = engine.generate(PROMPTS, SamplingParams(n=4, max_tokens=12, seed=0))
    stop = free[0][0].token_ids[3]  # a token this sampler emits at step 4 for this seed
    groups = engine.generate(
        PROMPTS, SamplingParams(n=4, max_tokens=12, seed=0, stop_token_ids=(stop,))
    )
    assert groups[0][0].token_ids == free[0][0].token_ids[: free[0][0].token_ids.index(stop) + 1]
    for group in groups:
        for r in group:
            if r.finish_reason == "stop":
                assert r.token_ids[-1] == stop and stop not in r.token_ids[:-1]
            else:
                assert len(r.token_ids) == 12 and stop not in r.token_ids
    # the context ends the response too: 64 positions, a 60-token prompt leaves 4
    long = engine.generate([[7] * 60], SamplingParams(max_tokens=50, seed=0))[0][0]
    assert len(long.token_ids) == 4 and long.finish_reason == "length"


def test_bad_prompts_are_named(engine):
    engine, _, _ = engine
    params = SamplingParams(max_tokens=4)
    for prompts, message in [
        ([[1, 2], []], "prompt 1 is empty"),
        ([[1] * 64], "prompt 0 has 64 tokens; the engine's context is 64"),
        ([[1, 200]], "prompt 0 has token ids outside [0, 200): [200]"),
        ([], "no prompts"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            engine.generate(prompts, params)


def test_sampling_params_are_checked():
    for key, value in [
        ("n", 0),
        ("temperature", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_tokens", 0),
    ]:
        with pytest.raises(ValueError, match=f"sampling.{key}"):
            SamplingParams(**{key: value})


def test_top_k_top_p_sample_from_the_renormalized_kept_set():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(4000, 1)
    cases = [
        (3, 1.0, [0, 1, 2]),
        (0, 0.8, [0, 1, 2]),
        (0, 0.65, [0, 1]),
        (0, 0.5, [0]),
        (2, 0.9, [0, 1]),
        (1, 1.0, [0]),
    ]
    for top_k, top_p, kept in cases:
        params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p)
        generators = [torch.Generator().manual_seed(i) for i in range(len(logits))]
        tokens, logprobs = sample(logits, params, generators)
        want = torch.log_softmax(logits[0, kept] / 0.9, -1)
        assert set(tokens.tolist()) == set(kept)
        for i, token in enumerate(kept):
            got = logprobs[tokens == token]
            torch.testing.assert_close(got, want[i].expand_as(got), atol=1e-6, rtol=0)
            frequency = (tokens == token).float().mean().item()
            p = want[i].exp().item()
            assert abs(frequency - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 1e-9


def test_incomplete_sync_is_refused_and_unknown_names_are_named():
    engine, model, _ = embedded_engine("qwen2")  # tied embeddings: no lm_head.weight is sent
    weights = dict(model.named_parameters())
    assert "lm_head.weight" not in weights
    with pytest.raises(ValueError, match=r"did not send \['model.norm.weight'\]"):
        engine.update_weights((k, v) for k, v in weights.items() if k != "model.norm.weight")
    with pytest.raises(RuntimeError, match="last weight update was incomplete"):
        engine.generate([[1, 2]], SamplingParams())
    with pytest.raises(KeyError, match=r"no parameter 'model\.extra'"):
        engine.update_weights([("model.extra", torch.zeros(1))])
    engine.update_weights(weights.items())
    assert engine.generate([[1, 2]], SamplingParams(max_tokens=2))[0][0].token_ids
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1, 2]], SamplingParams())
    engine.wake()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_sync_from_tp2_pp2_after_an_optimizer_step(pool4, name):
    results = pool4.run(sync_after_step, name, hf_model(name).state_dict(), 2, 2)
    last_stage = [r for r in results if r["before"] is not None]
    assert len(last_stage) == 2
    for r in last_stage:
        assert r["before"] > 1e-3  # the engine still has the old weights
        assert r["after"] < 1e-5
    hf_bytes = sum(p.numel() * 4 for p in hf_model(name).parameters())
    assert all(r["bytes"] == (hf_bytes, hf_bytes) for r in results)  # full tensors everywhere


def test_fan_out_raises_the_first_failure_without_waiting_for_the_others():
    """A server that refuses an update is reported while the others still block in it."""
    from megatron_rpg.rollout.protocol import EngineError
    from megatron_rpg.rollout.server_fleet import fan_out

    release = threading.Event()

    def refuses():
        raise EngineError("vllm serve at http://b:8000/update_weights: HTTP 500")

    started = time.monotonic()
    with pytest.raises(EngineError, match="http://b:8000"):
        fan_out([lambda: release.wait(60), refuses])
    assert time.monotonic() - started < 10
    release.set()
    assert fan_out([lambda: 1, lambda: 2]) == [1, 2]


def test_each_server_of_a_fleet_gets_the_ranks_after_the_earlier_servers_workers():
    """Group rank 0 is the trainer; servers of 2, 4 and 1 workers start at ranks 1, 3 and 7."""
    from megatron_rpg.rollout.server_fleet import FleetSyncClient, parse_server_urls

    class Recorder:
        def __init__(self):
            self.calls = []

        def init_weight_transfer_engine(self, info):
            self.calls.append(("init", info["rank_offset"], info["world_size"]))

        def update_weights(self, info):
            self.calls.append(("update", info))

    servers = [Recorder() for _ in range(3)]
    fleet = FleetSyncClient(servers, workers=[2, 4, 1])
    fleet.init_weight_transfer_engine({"rank_offset": 1, "world_size": 8})
    fleet.update_weights({"names": ["w"]})
    assert [s.calls for s in servers] == [
        [("init", offset, 8), ("update", {"names": ["w"]})] for offset in (1, 3, 7)
    ]
    urls = parse_server_urls("http://a:8000/, http://b:8000")
    assert urls == ["http://a:8000", "http://b:8000"]
