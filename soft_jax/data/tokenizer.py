"""Tokenizers: any HF tokenizer folder or hub name, a LLaMA GGUF vocabulary, or a small
byte-level BPE trained on the training text (for offline demos)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE PreTrainedTokenizerFast with <s>, </s>, <pad>, <unk>, trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def load_tokenizer(spec: str, train_texts: Iterable[str] | None = None):
    """Tokenizer from a spec: "bpe:N" (train on `train_texts`), "gguf:FILE", or a folder/hub name."""
    from transformers import AutoTokenizer

    if spec.startswith("bpe:"):
        if train_texts is None:
            raise ValueError("data.tokenizer='bpe:N' needs training text to learn from")
        return train_bpe(train_texts, int(spec.split(":", 1)[1]))
    if spec.startswith("gguf:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_file():
            raise FileNotFoundError(f"GGUF tokenizer file {str(path)!r} does not exist")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from soft_jax.data.formats import is_hub_id

    if not Path(spec).exists() and not is_hub_id(spec, allow_bare=True):
        raise FileNotFoundError(f"tokenizer folder {spec!r} does not exist")
    return AutoTokenizer.from_pretrained(spec)
