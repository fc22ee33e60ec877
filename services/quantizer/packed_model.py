"""Write an int4 model as a Hugging Face directory in the AutoAWQ GEMM layout.

The directory is what vLLM, TGI and transformers (with AutoAWQ kernels) load as an
AWQ checkpoint: `model.safetensors` with `<module>.qweight/.qzeros/.scales` in place
of each quantized `<module>.weight` (layout: lmforge.awq_gemm), every other tensor
as it was, and `config.json` with a `quantization_config` of `quant_method: awq`.

Two things AutoAWQ's format has no word for, recorded beside it:
- a layer whose width the group size does not divide has its own group size
  (`lmforge_group_sizes` in the config, and quantization.json); its `scales` and
  `qzeros` have the matching number of rows. lmforge's gateway reads them; other
  loaders that take one group size for the whole model refuse such a layer with a
  shape error rather than load it wrong;
- a Linear whose output width is not a multiple of 8 cannot be packed eight to a
  word: it stays in full precision and is listed in `modules_to_not_convert`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge import awq_gemm
from lmforge.modeling import QUANTIZATION_CONFIG
from services.quantizer.int4 import Int4Weight

WEIGHTS_FILE = "model.safetensors"


def packable(weight: torch.Tensor) -> bool:
    """Whether a [out, in] weight can be stored packed (eight output channels a word)."""
    return weight.shape[0] % awq_gemm.NIBBLES == 0


def carried_over(item: Path) -> bool:
    """Whether a file of the source model goes beside the quantized weights unchanged:
    not its weights, not the shard index naming them (a loader that finds
    `model.safetensors.index.json` looks for shards that are not there), not the
    artifact manifest."""
    return (item.is_file() and item.suffix != ".safetensors"
            and not item.name.endswith(".safetensors.index.json")
            and item.name != "MANIFEST.json")


def quantization_config(*, group_size: int, layer_groups: dict[str, int],
                        kept: list[str]) -> dict[str, Any]:
    """The `quantization_config` block of config.json (AutoAWQ's keys first)."""
    config: dict[str, Any] = {"quant_method": "awq", "bits": awq_gemm.BITS,
                              "group_size": group_size, "zero_point": True, "version": "gemm",
                              "modules_to_not_convert": ["lm_head", *kept]}
    odd = {name: size for name, size in layer_groups.items() if size != group_size}
    if odd:
        config["lmforge_group_sizes"] = odd
    return config


def write_int4_model(model_dir: Path, out_dir: Path, state: dict[str, torch.Tensor],
                     quantized: dict[str, Int4Weight], *, group_size: int,
                     metadata: dict[str, Any]) -> dict[str, int]:
    """Write `state` with the `quantized` weights packed into `out_dir`, the other files
    of `model_dir` (tokenizer, generation config) beside it. `metadata` goes into
    quantization.json. Returns the group size of each packed module."""
    tensors: dict[str, torch.Tensor] = {}
    layer_groups: dict[str, int] = {}
    kept: list[str] = []
    for name, tensor in state.items():
        weight = quantized.get(name)
        module = name.removesuffix(".weight")
        if weight is None:
            tensors[name] = tensor.contiguous()
        elif not packable(tensor):
            kept.append(module)
            tensors[name] = tensor.contiguous()
        else:
            packed = awq_gemm.pack(weight.codes, weight.zeros, weight.scales)
            for suffix, value in packed.items():
                tensors[f"{module}.{suffix}"] = value
            layer_groups[module] = weight.group_size
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    for item in model_dir.iterdir():
        if carried_over(item) and item.name != "config.json":
            shutil.copy2(item, out_dir / item.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(
        group_size=group_size, layer_groups=layer_groups, kept=kept)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / QUANTIZATION_CONFIG).write_text(json.dumps(
        {**metadata, "format": "awq-gemm", "bits": awq_gemm.BITS, "group_size": group_size,
         "layer_group_sizes": layer_groups, "kept_full_precision": kept}, indent=1))
    return layer_groups
