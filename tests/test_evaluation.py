"""The benchmark harness on the shipped data: reference answers score 1, shuffled answers about
0; pass@k against enumeration; maj@k and the bootstrap interval on constructed cases."""

import itertools
import json
import random

import pytest

from megatron_rpg.evaluation import (
    BENCHMARKS,
    PROMPT_TEMPLATE,
    bootstrap_interval,
    evaluate,
    load_benchmark,
    majority_correct,
    pass_at_k,
    to_markdown,
)
from megatron_rpg.rewards.sandbox import GraderPool


@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout_s=10.0, memory_mb=1024) as pool:
        yield pool


@pytest.fixture(scope="module")
def benchmarks():
    return {name: load_benchmark(name) for name in BENCHMARKS}


def answering(benchmarks, shuffle):
    """A 'model' that answers every prompt with the reference (or another problem's) answer."""
    by_prompt = {}
    for problems in benchmarks.values():
        answers = [p["answer"] for p in problems]
        if shuffle:
            answers = answers[1:] + answers[:1]  # every problem gets its neighbour's answer
        for p, a in zip(problems, answers, strict=True):
            by_prompt[PROMPT_TEMPLATE.format(problem=p["problem"])] = a

    def generate(prompts, k):
        return [[f"Some reasoning.\nAnswer: {by_prompt[p]}"] * k for p in prompts]

    return generate


def test_reference_answers_score_one_on_every_set(pool, benchmarks):
    results = evaluate(benchmarks, answering(benchmarks, shuffle=False), k=1, pool=pool)
    assert {n: r["problems"] for n, r in results.items()} == {
        "aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "gsm8k": 1319}  # fmt: skip
    for name, r in results.items():
        assert r["mean@1"] == r["pass@1"] == r["maj@1"] == 1.0, (name, r)
        assert r["grading"]["timeouts"] == r["grading"]["crashes"] == 0
    table = to_markdown(results)
    assert "| aime24 | 30 | 1.0000 [1.000, 1.000]" in table


def test_shuffled_answers_score_near_zero(pool, benchmarks):
    results = evaluate(benchmarks, answering(benchmarks, shuffle=True), k=1, pool=pool)
    for name, r in results.items():
        assert r["mean@1"] < 0.1, (name, r["mean@1"])  # neighbours may share an answer


@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in (1, 4, 6) for c in range(n + 1)
                                     for k in range(1, n + 1)])  # fmt: skip
def test_pass_at_k_is_the_chance_that_k_of_n_samples_contain_a_correct_one(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_closed_form_cases():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(32, 0, 8) == 0.0 and pass_at_k(32, 25, 8) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["3", "4", "4", None], [1, 0, 0, 0]) == 0  # "4" wins
    assert majority_correct(["3", "4", "3", "4"], [1, 0, 1, 0]) == 1  # a tie: the first seen
    assert majority_correct([None, None], [0, 0]) == 0


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_problems():
    rng = random.Random(1)
    small = [float(rng.random() < 0.3) for _ in range(30)]
    large = [float(rng.random() < 0.3) for _ in range(3000)]
    for values in (small, large):
        low, high = bootstrap_interval(values)
        assert low <= sum(values) / len(values) <= high
    assert (bootstrap_interval(large)[1] - bootstrap_interval(large)[0]) < (
        bootstrap_interval(small)[1] - bootstrap_interval(small)[0]) / 5  # fmt: skip


def test_bad_benchmark_lines_are_named(tmp_path):
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "p", "answer": "1"})
                                           + "\n{not json}\n")  # fmt: skip
    with pytest.raises(ValueError, match=r"aime24.jsonl:2: not JSON"):
        load_benchmark("aime24", tmp_path)
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"aime24.jsonl:1: field 'answer' missing"):
        load_benchmark("aime24", tmp_path)
    with pytest.raises(ValueError, match="is not one of"):
        load_benchmark("aime99", tmp_path)


def test_eval_command_from_hf_and_from_megatron_checkpoint_agree(tmp_path):
    """End to end on a tiny random model with a tokenizer trained here: the HF directory and its
    Megatron conversion generate the same responses, so their results are identical."""
    import subprocess
    import sys

    import torch
    import transformers

    from megatron_rpg.checkpoint import write_hf_checkpoint
    from megatron_rpg.tokenizer import train_sentencepiece

    problems = load_benchmark("aime24") + load_benchmark("gsm8k")[:50]
    hf = tmp_path / "hf"
    texts = [PROMPT_TEMPLATE.format(problem=p["problem"]) for p in problems]
    tokenizer = train_sentencepiece(texts, tmp_path / "tokenizer.model", 300)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    write_hf_checkpoint(hf, model.state_dict().items(), config.to_dict())
    (hf / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())

    def run(*args):
        return subprocess.run([sys.executable, "-m", "megatron_rpg.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    common = ["--benchmarks", "aime24,gsm8k", "--k", 2, "--limit", 3, "--max-tokens", 6]
    done = run("eval", "--hf", hf, *common, "--out", tmp_path / "from_hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| aime24 | 3 |" in done.stdout and "| gsm8k | 3 |" in done.stdout
    done = run("convert", "hf-to-mcore", "--hf", hf, "--out", tmp_path / "mcore")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("eval", "--ckpt", tmp_path / "mcore", *common, "--out", tmp_path / "from_mcore")
    assert done.returncode == 0, done.stderr[-3000:]
    from_hf = json.loads((tmp_path / "from_hf" / "results.json").read_text())
    from_mcore = json.loads((tmp_path / "from_mcore" / "results.json").read_text())
    assert from_hf == from_mcore
    for result in from_hf.values():
        assert 0.0 <= result["mean@2"] <= result["pass@2"] <= 1.0
    assert (tmp_path / "from_hf" / "results.md").read_text().startswith("| benchmark |")
