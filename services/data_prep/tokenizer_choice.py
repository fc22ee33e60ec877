"""Which tokenizer a dataset is tokenized with: one trained on the user's text, or the
base model's.

A run from scratch trains a byte-level BPE on its own training split
(tokenizer_training.py). A run that adapts a base model must use the base's
tokenizer unchanged: its ids index the base's embedding rows, so a tokenizer of
our own would feed the model nonsense. Its end-of-text token separates the
documents and its padding token (the end-of-text token where the base has
none) pads chat sequences; both are recorded in dataset.json for the trainer,
and its files (with its chat template) are copied into the dataset's
`tokenizer/` folder, which the trainer copies into the model it saves.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from lmforge.base_models import TOKENIZER_FILES, BaseModelError, BaseModelInfo
from services.data_prep.tokenizer_training import (
    EOS_TOKEN,
    PAD_TOKEN,
    save_tokenizer,
    train_bpe_tokenizer,
)


@dataclass(frozen=True, slots=True)
class DatasetTokenizer:
    tokenizer: Tokenizer
    eos_id: int
    pad_id: int
    vocab_size: int
    """Rows of the embedding the ids index (the base config's vocab_size, which may
    exceed the tokenizer's own count)."""
    source: str
    """"trained", or the base model directory."""
    chat_template: str | None = None


def trained_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, *,
                      seq_len: int) -> DatasetTokenizer:
    """A BPE trained on `texts`, saved to `out_dir` (from-scratch runs)."""
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    save_tokenizer(tokenizer, out_dir, model_max_length=seq_len)
    eos_id, pad_id = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    if eos_id is None or pad_id is None:
        raise RuntimeError(f"the trained tokenizer lacks {EOS_TOKEN!r} or {PAD_TOKEN!r}")
    return DatasetTokenizer(tokenizer, eos_id, pad_id, tokenizer.get_vocab_size(), "trained")


def base_tokenizer(base: BaseModelInfo, out_dir: Path) -> DatasetTokenizer:
    """The base model's tokenizer, its files copied to `out_dir` (no training)."""
    path = base.directory / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise BaseModelError(f"{path}: not a tokenizer the tokenizers library loads ({exc})"
                             ) from None
    if tokenizer.get_vocab_size() > base.vocab_size:
        raise BaseModelError(
            f"{path}: {tokenizer.get_vocab_size()} tokens, more than the "
            f"{base.vocab_size} embedding rows config.json declares; ids past the embedding "
            "would crash training")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (base.directory / name).is_file():
            shutil.copy2(base.directory / name, out_dir / name)
    pad = base.pad_token_id if base.pad_token_id is not None else base.eos_token_id
    return DatasetTokenizer(tokenizer, base.eos_token_id, pad, base.vocab_size,
                            str(base.directory), base.chat_template)
