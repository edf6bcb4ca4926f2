"""The benchmark harness on the shipped data: reference answers score 1, shuffled answers about
0; pass@k against enumeration; maj@k and the bootstrap interval on constructed cases."""

import itertools
import json
import random
import re

import pytest

from megatron_rpg.data import PROMPT_TEMPLATE
from megatron_rpg.evaluation import (
    BENCHMARKS,
    benchmark_name,
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
        "aime24": 30,
        "aime25": 30,
        "amc23": 40,
        "math500": 500,
        "gsm8k": 1319,
    }
    for name, r in results.items():
        assert r["mean@1"] == r["pass@1"] == r["maj@1"] == 1.0, (name, r)
        assert r["grading"]["timeouts"] == r["grading"]["crashes"] == 0
    table = to_markdown(results)
    assert "| aime24 | 30 | 1.0000 [1.000, 1.000]" in table


def test_shuffled_answers_score_near_zero(pool, benchmarks):
    results = evaluate(benchmarks, answering(benchmarks, shuffle=True), k=1, pool=pool)
    for name, r in results.items():
        assert r["mean@1"] < 0.1, (name, r["mean@1"])  # neighbours may share an answer


@pytest.mark.parametrize(
    "n, c, k", [(n, c, k) for n in (1, 4, 6) for c in range(n + 1) for k in range(1, n + 1)]
)
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
        bootstrap_interval(small)[1] - bootstrap_interval(small)[0]
    ) / 5


def test_bad_benchmark_lines_are_named(tmp_path):
    (tmp_path / "aime24.jsonl").write_text(
        json.dumps({"id": "a", "problem": "p", "answer": "1"}) + "\n{not json}\n"
    )
    with pytest.raises(ValueError, match=r"aime24.jsonl:2: not JSON"):
        load_benchmark("aime24", tmp_path)
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": "a", "problem": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"aime24.jsonl:1: field 'answer' missing"):
        load_benchmark("aime24", tmp_path)
    with pytest.raises(ValueError, match="is not one of"):
        load_benchmark("aime99", tmp_path)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_benchmark(str(tmp_path / "absent.jsonl"))


def test_a_jsonl_file_is_a_benchmark_named_by_its_stem_graded_by_last_number(tmp_path, pool):
    """A task's held-out split as a benchmark; a model that states no answer scores by its last
    number with answer_extraction='last_number' and zero with 'strict'."""
    path = tmp_path / "heldout.jsonl"
    problems = [{"problem": f"What is {a} x 7?", "answer": str(7 * a)} for a in range(2, 12)]
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    loaded = {benchmark_name(str(path)): load_benchmark(str(path))}
    assert list(loaded) == ["heldout"] and loaded["heldout"][3]["answer"] == "35"

    def generate(prompts, k):  # right on even a, off by one on odd a, never an Answer: line
        values = [7 * a + a % 2 for a in range(2, 12)]
        return [[f"{v // 7} times 7 is {v}"] * k for v in values]

    strict = evaluate(loaded, generate, 2, pool)["heldout"]
    flexible = evaluate(loaded, generate, 2, pool, answer_extraction="last_number")["heldout"]
    assert strict["mean@2"] == 0.0 and strict["maj@2"] == 0.0
    assert flexible["mean@2"] == flexible["maj@2"] == 0.5


@pytest.mark.slow
def test_eval_command_from_hf_and_from_megatron_checkpoint_agree(tmp_path, cli):
    """End to end on a tiny random model with a tokenizer trained here: the HF directory and its
    Megatron conversion generate the same responses, so their results are identical."""
    import torch
    import transformers

    from megatron_rpg.checkpoint import write_hf_checkpoint
    from megatron_rpg.tokenizer import train_sentencepiece

    problems = load_benchmark("aime24") + load_benchmark("gsm8k")[:50]
    hf = tmp_path / "hf"
    texts = [PROMPT_TEMPLATE.format(problem=p["problem"]) for p in problems]
    tokenizer = train_sentencepiece(texts, tmp_path / "tokenizer.model", 300)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    write_hf_checkpoint(hf, model.state_dict().items(), config.to_dict())
    (hf / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())

    common = ["--benchmarks", "aime24,gsm8k", "--k", 2, "--limit", 3, "--max-tokens", 6]
    done = cli("eval", "--hf", hf, *common, "--out", tmp_path / "from_hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| aime24 | 3 |" in done.stdout and "| gsm8k | 3 |" in done.stdout
    done = cli("convert", "hf-to-mcore", "--hf", hf, "--out", tmp_path / "mcore")
    assert done.returncode == 0, done.stderr[-3000:]
    done = cli("eval", "--ckpt", tmp_path / "mcore", *common, "--out", tmp_path / "from_mcore")
    assert done.returncode == 0, done.stderr[-3000:]
    from_hf = json.loads((tmp_path / "from_hf" / "results.json").read_text())
    from_mcore = json.loads((tmp_path / "from_mcore" / "results.json").read_text())
    assert from_hf == from_mcore
    for result in from_hf.values():
        assert 0.0 <= result["mean@2"] <= result["pass@2"] <= 1.0
    assert (tmp_path / "from_hf" / "results.md").read_text().startswith("| benchmark |")


def test_multiplication_problems_hold_out_whole_problems_and_state_true_products(tmp_path):
    from megatron_rpg.data.multiplication import FACTORS, TEMPLATES, main, multiplication_problems

    train, heldout = multiplication_problems(seed=0, heldout=150)
    assert len(train) + len(heldout) == len(TEMPLATES) * len(FACTORS) ** 2 and len(heldout) == 150
    assert not {p["problem"] for p in train} & {p["problem"] for p in heldout}
    for record in heldout[:20]:
        a, b = map(int, re.findall(r"\d+", record["problem"]))
        assert int(record["answer"]) == a * b
    assert multiplication_problems(seed=0)[1] == heldout
    assert multiplication_problems(seed=1)[1] != heldout
    main([str(tmp_path), "--heldout", "10"])
    assert load_benchmark(str(tmp_path / "heldout.jsonl")) == multiplication_problems(0, 10)[1]
    with pytest.raises(ValueError, match="heldout=0"):
        multiplication_problems(seed=0, heldout=0)


@pytest.mark.parametrize("template", ["plain", "dapo"])
def test_training_prompts_are_the_evaluation_prompts(tmp_path, template):
    """The task built from the config uses data.prompt_template, as evaluate() does (training
    once used the DAPO prompt whatever the config said)."""
    from megatron_rpg.build import build_task
    from megatron_rpg.config import DataConfig
    from megatron_rpg.data import PROMPT_TEMPLATES

    path = tmp_path / "train.jsonl"
    path.write_text('{"problem": "What is 6 x 7?", "answer": "42"}\n')
    task = build_task(DataConfig(task="math", train_path=str(path), prompt_template=template))
    problem = task.problems[0]
    assert task.prompt(problem) == PROMPT_TEMPLATES[template].format(problem="What is 6 x 7?")
    assert (task.prompt(problem) == "What is 6 x 7?") == (template == "plain")


def test_before_after_table_and_manifest_record(tmp_path):
    from megatron_rpg.evaluation import compare_to_markdown
    from megatron_rpg.run.manifest import record_evaluation, write_manifest

    def result(mean, low, high):
        r = {"problems": 150, "k": 4}
        for m in ("mean", "pass", "maj"):
            r[f"{m}@4"], r[f"{m}@4_ci95"] = mean, (low, high)
        return r

    table = compare_to_markdown(
        {"heldout": result(0.2, 0.15, 0.25)}, {"heldout": result(0.4, 0.33, 0.47)}
    )
    assert (
        "| heldout | mean@4 | 0.2000 [0.150, 0.250] | 0.4000 [0.330, 0.470] | +0.2000 | yes |"
        in table
    )
    overlapping = compare_to_markdown(
        {"heldout": result(0.2, 0.15, 0.25)}, {"heldout": result(0.24, 0.2, 0.3)}
    )
    assert overlapping.count("| no |") == 3
    with pytest.raises(ValueError, match="k=4 on 150 problems, after k=4 on 10"):
        compare_to_markdown(
            {"heldout": result(0.2, 0.1, 0.3)},
            {"heldout": {**result(0.2, 0.1, 0.3), "problems": 10}},
        )
    path = tmp_path / "manifest.json"
    write_manifest(path, {"seed": 3})
    record_evaluation(path, "eval_after", {"heldout": result(0.4, 0.33, 0.47)})
    data = json.loads(path.read_text())
    assert data["seed"] == 3 and data["evaluations"]["eval_after"]["heldout"]["mean@4"] == 0.4
    with pytest.raises(FileNotFoundError, match="no manifest"):
        record_evaluation(tmp_path / "absent.json", "x", {})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--k", "0"], "--k 0: need >= 1"),
        (["--limit", "-1"], "--limit -1: need >= 0"),
        (["--benchmarks", ","], "--benchmarks ,: need at least one name"),
        (["--temperature", "inf"], "--temperature inf: need finite"),
    ],
)
def test_eval_refuses_bad_flags_by_name(flags, message, capsys):
    from megatron_rpg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--hf", "model", "--out", "out", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
