"""Adapting a base model: its weights loaded from disk, then trained whole or through
LoRA adapters (peft).

Full continued pre-training needs nothing more than the base's weights in place of
random ones. LoRA freezes the base and trains a pair of rank-r matrices beside
each target projection, so the optimizer state and the gradients are those of
the adapters only, and so is a checkpoint: the engines save the trainable
tensors (`checkpoint_state_dict`), and a resume rebuilds the frozen base from its
directory before loading them. The result is saved twice: the adapter alone in
PEFT's format (one base, several adapters), and merged into the base as a plain
Hugging Face model that the quantizer, exporter and gateway take as they take a
model trained from scratch.

QLoRA-style base weights (int8/int4 while the adapters train) need
bitsandbytes' kernels, which exist for CUDA only: on any other device, or
without bitsandbytes, the request is refused with that reason (never trained
in fp32 in its place without saying so).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.trainer.config import AdapterConfig, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_DIR = "adapter"
"""The PEFT adapter's folder inside the saved model directory."""


def quantized_base_unavailable(base_weights: str, device: torch.device) -> str:
    """Why `base_weights` cannot be honoured on `device`, or "" when it can."""
    if not base_weights:
        return ""
    if device.type != "cuda":
        return (f"{base_weights} base weights (QLoRA) need bitsandbytes' CUDA kernels; this "
                f"job runs on {device.type}, where none exists: adapt with base_weights='' "
                "(the base in fp32) or run on a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"{base_weights} base weights (QLoRA) need the bitsandbytes package, which "
                "is not installed in the trainer")
    return ""


def load_pretrained(directory: Path, adapter: AdapterConfig, device: torch.device
                    ) -> PreTrainedModel:
    """The base model from `directory` (local files only), quantized where asked."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if adapter.base_weights:
        why = quantized_base_unavailable(adapter.base_weights, device)
        if why:
            raise ConfigError(why)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=adapter.base_weights == "int8",
            load_in_4bit=adapter.base_weights == "int4", bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0}
    use_safetensors = any(directory.glob("*.safetensors"))
    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, local_files_only=True,
        use_safetensors=use_safetensors, **kwargs)


def with_lora(model: PreTrainedModel, adapter: AdapterConfig) -> PreTrainedModel:
    """`model` with LoRA adapters on `adapter.targets`; only the adapters train."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if adapter.base_weights:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(adapter.targets) - names)
    if missing:
        raise ConfigError(f"adapter.targets {missing} name no module of this "
                          f"{model.config.model_type} model")
    # peft annotates lora_alpha as int, but scales by alpha / r in floats.
    config = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha,  # type: ignore[arg-type]
                        lora_dropout=adapter.dropout, target_modules=list(adapter.targets),
                        bias="none", task_type="CAUSAL_LM")
    peft_model: PreTrainedModel = get_peft_model(model, config)  # type: ignore[assignment]
    return peft_model


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: everything, or for LoRA the adapters alone
    (the frozen base is rebuilt from its directory on resume)."""
    state = model.state_dict()
    if is_lora(model):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_checkpoint_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """The inverse of `checkpoint_state_dict`: every tensor it saved must come back."""
    if not is_lora(model):
        model.load_state_dict(state)
        return
    result = model.load_state_dict(state, strict=False)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(f"the LoRA checkpoint does not match the model: missing "
                         f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def merged_and_adapter(base_dir: Path, adapter: AdapterConfig,
                       state: dict[str, torch.Tensor], out: Path) -> PreTrainedModel:
    """Save the trained adapter alone to `out/adapter` (PEFT format) and return the base
    with the adapter merged into its weights (a plain transformers model, fp32)."""
    base = load_pretrained(base_dir, AdapterConfig(kind="lora", rank=adapter.rank,
                                                   alpha=adapter.alpha,
                                                   dropout=adapter.dropout,
                                                   targets=adapter.targets),
                           torch.device("cpu"))
    model = with_lora(base, AdapterConfig(kind="lora", rank=adapter.rank, alpha=adapter.alpha,
                                          dropout=adapter.dropout, targets=adapter.targets))
    load_checkpoint_state_dict(model, {k: v for k, v in state.items() if "lora_" in k})
    model.save_pretrained(str(out / ADAPTER_DIR), safe_serialization=True)
    merged: PreTrainedModel = model.merge_and_unload()  # type: ignore[operator]
    return merged.eval()
