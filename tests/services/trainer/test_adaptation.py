"""Adapting a base model: full continued pre-training and LoRA, exact resume, and outputs
(a merged Hugging Face model carrying the base's tokenizer and generation config, and the
adapter alone in PEFT's format)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from lmforge.base_models import inspect_base_model
from lmforge.modeling import load_causal_lm
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.trainer.adaptation import ADAPTER_DIR
from services.trainer.checkpoints import CheckpointIndex
from services.trainer.config import ConfigError, TrainConfig
from services.trainer.training import Trainer
from tests.conftest import TEST_DATA


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory, artifact_store, base_models):
    """The fortunes sample tokenized with the tiny Llama base's tokenizer."""
    base = inspect_base_model(str(base_models["llama"]), [base_models["llama"].parent])
    work = tmp_path_factory.mktemp("base-ds") / "ds"
    prepare_dataset(TEST_DATA / "fortunes-sample.txt", "text", "", work,
                    PrepConfig.hygiene_only(vocab_size=1024, seq_len=64), base=base)
    return artifact_store.put_dir(work)


def _trainer(tmp_path, store, dataset, base_dir, run_id, **overrides):
    config = TrainConfig.from_preset("test-tiny", **{
        "max_steps": 6, "checkpoint_interval": 2, "pretrained_dir": base_dir,
        "learning_rate": 1e-3, **overrides})
    return Trainer(config, dataset.path, store, CheckpointIndex(tmp_path, run_id, store))


def test_full_fine_tuning_starts_from_the_base_weights(tmp_path, artifact_store, base_dataset,
                                                       base_models):
    trainer = _trainer(tmp_path, artifact_store, base_dataset, base_models["llama"], "full0")
    base = load_file(str(base_models["llama"] / "model.safetensors"))
    model_state = trainer.engine.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in base.items())
    assert trainer.trainable_parameters == trainer.parameters


@pytest.mark.parametrize("adapter_kind", ["full", "lora"])
def test_adapting_resumes_exactly(tmp_path, artifact_store, base_dataset, base_models,
                                  adapter_kind):
    base_dir = base_models["llama"]
    whole = _trainer(tmp_path, artifact_store, base_dataset, base_dir, f"{adapter_kind}-whole",
                     adapter_kind=adapter_kind).run()
    first = _trainer(tmp_path, artifact_store, base_dataset, base_dir, f"{adapter_kind}-split",
                     adapter_kind=adapter_kind)
    stop = threading.Event()
    part = first.run(stop=stop, on_checkpoint=lambda ref: ref.step >= 2 and stop.set())
    assert part.preempted and part.checkpoint is not None
    checkpoint = artifact_store.get_dir(part.checkpoint.digest)
    saved = load_file(str(checkpoint / "model.safetensors"))
    if adapter_kind == "lora":  # the adapters and nothing of the frozen base
        assert saved and all("lora_" in name for name in saved)
        assert sum(v.numel() for v in saved.values()) == first.trainable_parameters
        assert first.trainable_parameters < first.parameters / 5
    else:
        assert sum(v.numel() for v in saved.values()) == first.parameters
    rest = _trainer(tmp_path, artifact_store, base_dataset, base_dir, f"{adapter_kind}-split",
                    adapter_kind=adapter_kind).run()
    assert part.losses + rest.losses == pytest.approx(whole.losses, abs=1e-6)
    assert rest.heldout_perplexity == pytest.approx(whole.heldout_perplexity, rel=1e-6)


def test_lora_output_is_a_merged_model_and_the_adapter_alone(tmp_path, artifact_store,
                                                             base_dataset, base_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = base_models["llama"]
    result = _trainer(tmp_path, artifact_store, base_dataset, base_dir, "lora-out",
                      adapter_kind="lora", rank=4, alpha=8.0, targets=["q_proj", "v_proj"],
                      max_steps=4).run()
    out = result.model_dir
    assert out is not None
    # The base's own tokenizer and generation config travel with the model.
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base_dir / name).read_bytes()
    adapter = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8.0)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    # The merged model equals the base with the adapter applied by peft itself.
    merged = load_causal_lm(out)
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out / ADAPTER_DIR)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)
    assert result.heldout_perplexity > 1


def test_quantized_base_weights_are_refused_on_cpu_saying_why(tmp_path, artifact_store,
                                                               base_dataset, base_models):
    with pytest.raises(ConfigError, match=r"int4 base weights .* need bitsandbytes' CUDA "
                       r"kernels; this job runs on cpu"):
        _trainer(tmp_path, artifact_store, base_dataset, base_models["llama"], "qlora",
                 adapter_kind="lora", base_weights="int4")
