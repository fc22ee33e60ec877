"""data-prep with a base model: its tokenizer, its EOS and PAD, no tokenizer trained."""

from __future__ import annotations

import json

import numpy as np
from tokenizers import Tokenizer

from lmforge.base_models import inspect_base_model
from lmforge.modeling import load_token_stream
from services.data_prep.prepare import PrepConfig, prepare_dataset
from tests.conftest import TEST_DATA


def test_a_base_models_tokenizer_is_used_as_is(base_models, tmp_path):
    base = inspect_base_model(str(base_models["qwen2"]), [base_models["qwen2"].parent])
    out = tmp_path / "ds"
    prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", out,
                    PrepConfig.hygiene_only(vocab_size=1024, seq_len=64), base=base)
    meta = json.loads((out / "dataset.json").read_text())
    # The base's ids: its vocabulary (not the 1024 asked of a trained one), its <|im_end|>
    # between documents, its <|endoftext|> for padding.
    assert meta["vocab_size"] == base.vocab_size == 600
    assert (meta["eos_token_id"], meta["pad_token_id"]) == (2, 0)
    assert meta["tokenizer"] == str(base.directory)
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == \
        (base.directory / "tokenizer.json").read_bytes()
    tokens = load_token_stream(out, "train")
    ends = np.flatnonzero(tokens == 2)
    assert len(ends) == meta["train"]["documents"]
    first = Tokenizer.from_file(str(base.directory / "tokenizer.json")).decode(
        tokens[: ends[0]].tolist())
    corpus = (TEST_DATA / "fortunes-sample.txt").read_text()
    assert first.strip() and first.strip().split("\n")[0] in corpus
