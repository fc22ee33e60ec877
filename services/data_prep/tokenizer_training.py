"""Training a byte-level BPE tokenizer on the user's own text.

Byte-level, so every string round-trips, CJK and emoji included, and no text
is ever <unk>. CJK punctuation is split off before the byte-level regex, so
long unspaced Chinese sentences break into clauses and merges learn words
rather than whole sentences. Saved as a `PreTrainedTokenizerFast` directory,
which old and new transformers both load (transformers 5 would otherwise
record `TokenizersBackend`, which older versions cannot read).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
_CJK_PUNCTUATION = Regex(r"[\u3000-\u303f\uff01-\uff0f\uff1a-\uff20]")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
                        ) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(_CJK_PUNCTUATION, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path, *, model_max_length: int) -> None:
    """Write a directory that `AutoTokenizer.from_pretrained` loads."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
