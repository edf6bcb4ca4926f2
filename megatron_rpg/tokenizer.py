"""Tokenizers: a sentencepiece model (trained locally for the embedded task, or shipped with a
checkpoint) and a Hugging Face tokenizer behind one small interface.

    tokenizer = train_sentencepiece(corpus_lines, "run/tokenizer.model", vocab_size=48,
                                    symbols=list("0123456789+="))
    ids = tokenizer.encode("3+4=")           # no BOS/EOS added
    text = tokenizer.decode(ids)
    prompt = tokenizer.encode_prompt(text)   # the chat template's user turn, when it applies

`encode_prompt` is the one way a task's prompt text becomes the model's input, in training,
evaluation and SFT alike: with a chat template (`chat_template` 'on', or 'auto' and the
tokenizer has one) the text is the user's message, followed by the assistant's header;
otherwise it is encoded as is.

Training is deterministic (one thread, fixed seed, no sampling of the corpus), so every rank and
every resumed run that trains it from the same corpus gets the same model file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

ChatTemplate = Literal["auto", "on", "off"]
CHAT_TEMPLATE_KEY = "data.chat_template"


class Tokenizer:
    chat = False  # sentencepiece models carry no chat template

    def __init__(self, model_file: str | Path, chat_template: ChatTemplate = "auto"):
        import sentencepiece

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer: no sentencepiece model at {path}")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.path = path
        self.vocab_size = int(self.processor.get_piece_size())
        self.eos_id = int(self.processor.eos_id())
        self.pad_id = int(self.processor.pad_id())
        if self.eos_id < 0 or self.pad_id < 0:
            raise ValueError(
                f"tokenizer {path}: needs eos and pad pieces (eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})"
            )
        if chat_template == "on":
            raise ValueError(
                f"{CHAT_TEMPLATE_KEY}=on: the sentencepiece tokenizer {path} has no chat template"
            )

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, without eos/pad; ids the model's (larger) vocabulary has but the
        tokenizer does not read as U+FFFD."""
        pieces = []
        for i in ids:
            if i in (self.eos_id, self.pad_id):
                continue
            pieces.append(self.processor.decode([i]) if 0 <= i < self.vocab_size else "\ufffd")
        return "".join(pieces)


class HFTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json, with its chat template if it has one)
    behind the same interface."""

    def __init__(self, directory: str | Path, chat_template: ChatTemplate = "auto"):
        import transformers

        self.processor = transformers.AutoTokenizer.from_pretrained(str(directory))
        self.path = Path(directory)
        self.vocab_size = len(self.processor)
        if self.processor.eos_token_id is None:
            raise ValueError(f"tokenizer in {directory}: no eos token")
        self.eos_id = int(self.processor.eos_token_id)
        pad = self.processor.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        has_template = bool(self.processor.chat_template)
        if chat_template == "on" and not has_template:
            raise ValueError(
                f"{CHAT_TEMPLATE_KEY}=on: the tokenizer in {directory} has no chat template"
            )
        self.chat = chat_template == "on" or (chat_template == "auto" and has_template)

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        if not self.chat:
            return self.encode(text)
        messages = [{"role": "user", "content": text}]
        rendered = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode(str(rendered))  # the template writes the special tokens itself

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.processor.decode(list(ids), skip_special_tokens=True))


def load_tokenizer(
    directory: str | Path, chat_template: ChatTemplate = "auto"
) -> Tokenizer | HFTokenizer:
    """The tokenizer shipped in a model or checkpoint directory: tokenizer.json (Hugging Face)
    or tokenizer.model (sentencepiece)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory, chat_template)
    if (directory / "tokenizer.model").is_file():
        return Tokenizer(directory / "tokenizer.model", chat_template)
    raise FileNotFoundError(f"{directory}: no tokenizer.json or tokenizer.model")


def train_sentencepiece(
    corpus: Iterable[str], out: str | Path, vocab_size: int, symbols: Iterable[str] = ()
) -> Tokenizer:
    """Train a unigram model of at most `vocab_size` pieces on `corpus`; `symbols` become single
    pieces (e.g. digits, so that numbers are spelled digit by digit). Written atomically."""
    import sentencepiece

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        user_defined_symbols=list(symbols),
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        num_threads=1,
        add_dummy_prefix=False,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    staging.write_bytes(model.getvalue())
    os.replace(staging, out)
    return Tokenizer(out)
