"""Model code several services share: build a Llama from a plan, load models,
tokenizers and token shards, measure perplexity.

torch and transformers are imported inside the functions, so `import lmforge`
stays light for the services that never touch a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

QUANTIZED_WEIGHTS = "quantized.safetensors"
"""The quantizer's int8 output: `<name>.qcodes` (int8 codes) and `<name>.qscales`
(fp32, one per output channel and input group) for each quantized weight, every
other tensor as is. int4 is a Hugging Face AWQ directory instead (awq_gemm.py)."""
QUANTIZATION_CONFIG = "quantization.json"
"""What the quantizer did: method, group sizes per layer, perplexities."""

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast


def llama_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, seq_len: int, eos_token_id: int,
                 pad_token_id: int) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=seq_len,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def qwen2_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, seq_len: int, eos_token_id: int,
                 pad_token_id: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=seq_len,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )


def training_flops_per_token(parameters: int, num_layers: int, hidden_size: int,
                             seq_len: int) -> float:
    """6·N for the weights (forward + backward) plus 12·L·H·T for attention."""
    return 6 * parameters + 12 * num_layers * hidden_size * seq_len


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def load_causal_lm(directory: Path, *, dtype: Any = None) -> PreTrainedModel:
    """Load a Hugging Face model directory; only safetensors weights are accepted."""
    import torch
    from transformers import AutoModelForCausalLM

    if not any(Path(directory).glob("*.safetensors")):
        raise FileNotFoundError(f"{directory} holds no .safetensors weights")
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype or torch.float32, use_safetensors=True
    )
    model.eval()
    return model


def load_token_stream(dataset_dir: Path, part: str) -> np.ndarray:
    """All tokens of `part` ("train" or "heldout") as one int64 array."""
    from safetensors.numpy import load_file

    meta = json.loads((dataset_dir / "dataset.json").read_text())
    arrays = [load_file(str(dataset_dir / part / name))["tokens"]
              for name in meta[part]["shards"]]
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(arrays).astype(np.int64)


LOSS_MASK = "loss_mask"
"""The shard tensor beside `tokens` marking the trained tokens of chat data (1 = an
assistant's token); data-prep's packing.py writes it, the trainer reads it."""


def load_loss_mask(dataset_dir: Path, part: str) -> np.ndarray | None:
    """The loss mask of `part` aligned with `load_token_stream`, or None where the part
    has none (plain text, where every token is trained)."""
    from safetensors.numpy import load_file

    meta = json.loads((dataset_dir / "dataset.json").read_text())
    if not meta[part].get(LOSS_MASK):
        return None
    arrays = [load_file(str(dataset_dir / part / name))[LOSS_MASK]
              for name in meta[part]["shards"]]
    mask = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint8)
    if len(mask) != int(meta[part]["tokens"]):
        raise ValueError(f"{dataset_dir / part}: loss mask of {len(mask)} for "
                         f"{meta[part]['tokens']} tokens; prepare the dataset again")
    return mask.astype(np.uint8)


def evaluation_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Non-overlapping windows of seq_len tokens (the last partial one dropped)."""
    count = min(len(tokens) // seq_len, max_windows)
    if count == 0:
        # A held-out part shorter than one window: evaluate what there is.
        return tokens[None, :]
    return tokens[: count * seq_len].reshape(count, seq_len)


def perplexity(model: torch.nn.Module, tokens: np.ndarray, *, seq_len: int,
               batch_size: int = 16, max_windows: int = 256) -> float:
    """exp(mean next-token cross-entropy) over held-out windows."""
    import torch

    windows = torch.from_numpy(evaluation_windows(tokens, seq_len, max_windows))
    if windows.shape[1] < 2:
        raise ValueError("held-out data needs at least two tokens for perplexity")
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            logits = model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_loss += loss.item()
            total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_loss / total_tokens)


def dequantize_tensor(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out_features, in_features = codes.shape
    groups = scales.shape[1]
    grouped = codes.float().reshape(out_features, groups, in_features // groups)
    return (grouped * scales[..., None]).reshape(out_features, in_features)


def dequantize_state_dict(quantized: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, tensor in quantized.items():
        if name.endswith(".qcodes"):
            base = name.removesuffix(".qcodes")
            state[base] = dequantize_tensor(tensor, quantized[f"{base}.qscales"])
        elif not name.endswith(".qscales"):
            state[name] = tensor
    return state


def is_awq_model(directory: Path) -> bool:
    """Whether `directory` is a Hugging Face model stored packed by AWQ (config.json)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "awq"


def empty_model_of(directory: Path) -> PreTrainedModel:
    """The model class of `directory`'s config.json with fresh fp32 Linears (a
    `quantization_config` in it is dropped: the caller loads the weights itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_config(config)


def load_dequantized_model(quantized_dir: Path) -> PreTrainedModel:
    """A transformers model carrying the quantized weights (int8 codes or packed AWQ
    int4), dequantized to fp32."""
    from safetensors.torch import load_file

    from lmforge import awq_gemm

    model = empty_model_of(quantized_dir)
    if (quantized_dir / QUANTIZED_WEIGHTS).exists():
        state = dequantize_state_dict(load_file(str(quantized_dir / QUANTIZED_WEIGHTS)))
    else:
        state = {}
        for shard in sorted(quantized_dir.glob("*.safetensors")):
            state.update(load_file(str(shard)))
        state = awq_gemm.dequantize_state_dict(state)
    model.load_state_dict(state)
    model.eval()
    return model
