"""Base model directories: what is read from them, and each refusal naming file and reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.base_models import BaseModelError, inspect_base_model


def copy_of(base: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models" / base.name
    shutil.copytree(base, target)
    return target


def test_a_sharded_qwen2_base_is_described_from_its_files(base_models, tmp_path):
    info = inspect_base_model(str(base_models["qwen2"]), [base_models["qwen2"].parent])
    assert info.family == "qwen2" and info.weight_format == "safetensors"
    assert len(info.weight_files) > 1  # the index and its shards were followed
    assert (info.num_heads, info.num_kv_heads, info.num_layers) == (4, 2, 2)
    # The real count from the weights' shapes, Qwen2's attention biases included.
    from safetensors.numpy import load_file
    total = sum(t.size for name in info.weight_files
                for t in load_file(str(base_models["qwen2"] / name)).values())
    assert info.parameters == total
    assert info.eos_token_id == 2 and info.pad_token_id == 0
    assert info.chat_template and "<|im_start|>" in info.chat_template


def test_a_directory_outside_the_roots_is_refused(base_models, tmp_path):
    with pytest.raises(BaseModelError, match="outside the allowed roots"):
        inspect_base_model(str(base_models["llama"]), [tmp_path / "elsewhere"])


def test_a_hub_id_is_refused_and_never_downloaded(tmp_path):
    with pytest.raises(BaseModelError, match="never downloads from the hub"):
        inspect_base_model("Qwen/Qwen2.5-0.5B", [tmp_path])


def test_an_unknown_architecture_is_refused_naming_config_json(base_models, tmp_path):
    base = copy_of(base_models["llama"], tmp_path)
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "gpt2"
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match=r"config\.json: unknown architecture.*gpt2"):
        inspect_base_model(str(base), [tmp_path])


def test_a_missing_tokenizer_is_refused_naming_tokenizer_json(base_models, tmp_path):
    base = copy_of(base_models["llama"], tmp_path)
    (base / "tokenizer.json").unlink()
    with pytest.raises(BaseModelError, match=r"tokenizer\.json: missing"):
        inspect_base_model(str(base), [tmp_path])


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("hidden_size", 128, r"model\.embed_tokens\.weight .* has shape \[\d+, 64\]"),
    ("num_hidden_layers", 3, "num_hidden_layers is 3 but the weights hold 2 layers"),
    ("num_key_value_heads", 4,
     r"model.layers.0.self_attn.k_proj\.weight .* has shape \[32, 64\].* implies \[64, 64\]"),
])
def test_a_config_that_does_not_match_the_weights_is_refused(base_models, tmp_path, key,
                                                             value, reason):
    base = copy_of(base_models["qwen2"], tmp_path)
    config = json.loads((base / "config.json").read_text())
    config[key] = value
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match=r"config\.json does not match the weights: "
                       + reason):
        inspect_base_model(str(base), [tmp_path])


def test_a_pickle_checkpoint_is_refused_unless_allowed(base_models, tmp_path):
    base = copy_of(base_models["llama"], tmp_path)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(BaseModelError, match=r"pytorch_model\.bin: a pickle checkpoint; only "
                       "safetensors"):
        inspect_base_model(str(base), [tmp_path])
    allowed = inspect_base_model(str(base), [tmp_path], allow_pickle=True)
    assert allowed.weight_format == "pickle" and allowed.weight_files == ("pytorch_model.bin",)
