"""Tiny base models saved as Hugging Face directories, each with its own small tokenizer.

They stand in for a downloaded Llama or Qwen2 checkpoint: random weights, a
byte-level BPE tokenizer trained on the shipped fortunes sample with ChatML
special tokens and a chat template, safetensors weights (the Qwen2 one sharded
with an index, as large checkpoints are), a generation config of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TEST_DATA = Path(__file__).resolve().parent / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The chat template both tiny bases ship (Qwen's ChatML shape)."""

BASE_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 160}


def save_base_tokenizer(directory: Path) -> int:
    """A byte-level BPE with ChatML specials (eos <|im_end|>, pad <|endoftext|>); returns
    its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (TEST_DATA / "fortunes-sample.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(text.split("\n%\n"), trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False}))
    return tokenizer.get_vocab_size()


def save_base_model(directory: Path, family: str, *, sharded: bool = False,
                    seed: int = 0) -> Path:
    """A random `family` ("llama" or "qwen2") model with its tokenizer in `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    vocab = save_base_tokenizer(directory)
    eos = json.loads((directory / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in eos["added_tokens"]}
    config_type = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    config = config_type(vocab_size=vocab, max_position_embeddings=512,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=None, tie_word_embeddings=False, **BASE_SHAPE)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory), safe_serialization=True,
                          max_shard_size="100KB" if sharded else "5GB")
    GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                     do_sample=False, max_new_tokens=24).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def base_models(tmp_path_factory) -> dict[str, Path]:
    """{"llama": dir, "qwen2": dir}: the Qwen2 one in several safetensors shards."""
    root = tmp_path_factory.mktemp("base-models")
    return {"llama": save_base_model(root / "tiny-llama", "llama"),
            "qwen2": save_base_model(root / "tiny-qwen2", "qwen2", sharded=True)}
