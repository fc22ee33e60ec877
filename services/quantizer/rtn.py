"""Weight-only round-to-nearest int8: symmetric codes, one scale per output channel.

Each Linear weight inside the decoder layers gets symmetric integer codes
with one fp32 scale per output channel and group of `group_size` inputs
(group_size 0 = the whole row). Embeddings, norms and the LM head stay fp32:
they are small here and the most sensitive. Codes are stored as int8 tensors
in safetensors, next to the scales. int4 (round-to-nearest and AWQ) is
asymmetric and packed: int4.py and packed_model.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.modeling import QUANTIZATION_CONFIG, QUANTIZED_WEIGHTS, dequantize_state_dict
from services.quantizer.packed_model import carried_over


@dataclass(frozen=True, slots=True, kw_only=True)
class RtnConfig:
    bits: int = 8
    """8 (int4 is int4.py's)."""
    group_size: int = 0
    """Input columns per scale; 0 = one scale per output channel."""

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ValueError(f"bits {self.bits}: round-to-nearest here is int8; int4 is "
                             "asymmetric and packed (services/quantizer/int4.py)")
        if self.group_size < 0:
            raise ValueError(f"group_size {self.group_size} must be >= 0")

    @property
    def method(self) -> str:
        return f"rtn-int{self.bits}"


def quantize_tensor(weight: torch.Tensor, config: RtnConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int8, same shape) and scales (out, groups) for a 2-D weight."""
    out_features, in_features = weight.shape
    group = config.group_size or in_features
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group {group}")
    qmax = 2 ** (config.bits - 1) - 1
    grouped = weight.float().reshape(out_features, in_features // group, group)
    scales = grouped.abs().amax(dim=-1).clamp(min=1e-8) / qmax
    codes = torch.round(grouped / scales[..., None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return codes.reshape(out_features, in_features), scales


def quantizable(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and ".layers." in name and name.endswith(".weight")


def quantize_state_dict(state: dict[str, torch.Tensor], config: RtnConfig
                        ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if quantizable(name, tensor):
            codes, scales = quantize_tensor(tensor, config)
            out[f"{name}.qcodes"] = codes.contiguous()
            out[f"{name}.qscales"] = scales.contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def write_quantized_model(model_dir: Path, out_dir: Path, config: RtnConfig
                          ) -> dict[str, torch.Tensor]:
    """Quantize the model in `model_dir` into `out_dir`; return the dequantized weights."""
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    quantized = quantize_state_dict(state, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(quantized, str(out_dir / QUANTIZED_WEIGHTS))
    for item in model_dir.iterdir():
        if carried_over(item):
            shutil.copy2(item, out_dir / item.name)
    (out_dir / QUANTIZATION_CONFIG).write_text(json.dumps(
        {"method": config.method, "bits": config.bits, "group_size": config.group_size,
         "format": "lmforge-qcodes/1"}, indent=1))
    return dequantize_state_dict(quantized)
