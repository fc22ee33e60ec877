"""Base models: a local Hugging Face directory a run adapts instead of training from scratch.

Three services read a base model and each needs to trust it before it spends
work on it: data-prep tokenizes with its tokenizer, the scheduler sizes the run
from its real parameter count and shape, the trainer loads its weights. They
all call `inspect_base_model`, which reads only JSON and the safetensors headers
(no torch, so the scheduler can call it) and refuses, naming the file and the
reason, a directory that is

- outside the allowed roots (LMFORGE_MODEL_ROOTS, else LMFORGE_DATA_ROOTS);
- of an architecture lmforge does not build (only Llama and Qwen2 layouts);
- without a fast tokenizer (`tokenizer.json`);
- holding pickle (`.bin`/`.pt`) weights while only safetensors are allowed (the
  default: unpickling a downloaded checkpoint runs whatever code it carries);
- carrying a `config.json` that does not match the weights' shapes (a config
  copied from a sibling model would otherwise load with random or truncated
  tensors, or fail in the middle of training).

Nothing here, nor where the weights are loaded (`load_base_model`), ever
reaches for the Hugging Face hub: paths are resolved locally and transformers is
called with `local_files_only=True`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.failures import BadInput

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""model_type in config.json -> the class lmforge trains (and the family name it uses)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   CHAT_TEMPLATE_FILE)
"""What a base's tokenizer is made of; only tokenizer.json is required."""
GENERATION_CONFIG = "generation_config.json"
_MAX_HEADER_BYTES = 100 << 20
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class BaseModelError(BadInput, ValueError):
    """A base model directory lmforge will not use; the message names the file and why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseModelInfo:
    """What a checked base model is: enough to plan, tokenize and load it."""

    directory: Path
    family: str
    """"llama" or "qwen2" (config.json's model_type)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    parameters: int
    """Counted from the weights' shapes (the config's formula for pickle weights)."""
    weight_files: tuple[str, ...]
    weight_format: str
    """"safetensors" or "pickle" (only when pickles are allowed)."""
    eos_token_id: int
    pad_token_id: int | None
    """The tokenizer's (or config's) padding token; None: the base has none."""
    chat_template: str | None
    """The tokenizer's chat template, when the base ships one."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def model_roots(model_roots_setting: Sequence[str], data_roots: Sequence[str]) -> list[Path]:
    """Where base models may be read from: LMFORGE_MODEL_ROOTS, else the data roots."""
    chosen = model_roots_setting or [r for r in data_roots if "://" not in r]
    return [Path(r).expanduser().resolve() for r in chosen]


def resolve_base_model_dir(spec: str, roots: Iterable[Path]) -> Path:
    """The directory `spec` names, resolved (symlinks followed) and inside a root.

    A hub id such as "Qwen/Qwen2.5-0.5B" is refused like any path that does not
    exist: nothing is downloaded.
    """
    roots = list(roots)
    raw = spec.removeprefix("file://")
    if not raw:
        raise BaseModelError("base model: no directory given")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise BaseModelError(
            f"base model {spec!r} is not an absolute path to a local directory; lmforge never "
            "downloads from the hub: download it yourself (e.g. `hf download ... --local-dir`) "
            "and pass the directory")
    resolved = path.resolve()
    listing = os.pathsep.join(str(r) for r in roots)
    if not any(resolved.is_relative_to(root) for root in roots):
        raise BaseModelError(
            f"base model directory '{resolved}' is outside the allowed roots "
            f"(LMFORGE_MODEL_ROOTS, else LMFORGE_DATA_ROOTS: {listing or 'none'})")
    if not resolved.is_dir():
        raise BaseModelError(f"base model directory '{resolved}' does not exist or is not a "
                             "directory")
    return resolved


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaseModelError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BaseModelError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BaseModelError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone (no tensor is read)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER_BYTES:
                raise BaseModelError(f"{path}: safetensors header of {length} bytes is not "
                                     "plausible; the file is damaged")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise BaseModelError(f"{path}: not a readable safetensors file ({exc})") from None
    return {name: list(entry["shape"]) for name, entry in header.items()
            if name != "__metadata__"}


def _weight_files(directory: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BaseModelError(f"{index}: has no weight_map")
        shards = sorted({directory / str(name) for name in weight_map.values()})
        for shard in shards:
            if not shard.resolve().is_relative_to(directory) or not shard.is_file():
                raise BaseModelError(f"{index}: names shard '{shard.name}', which is not a "
                                     f"file in {directory}")
        return shards, "safetensors"
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        return safetensors, "safetensors"
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise BaseModelError(
            f"{pickles[0]}: a pickle checkpoint; only safetensors weights are allowed "
            "(unpickling runs code the file carries). Convert it to safetensors, or allow "
            "pickles with LMFORGE_BASE_MODEL_ALLOW_PICKLE=true if you trust its source")
    if pickles:
        return pickles, "pickle"
    raise BaseModelError(f"{directory}: holds no model weights (*.safetensors, or "
                         f"{SAFETENSORS_INDEX} and its shards)")


def _expected_shapes(config: dict[str, Any], layers: int) -> dict[str, list[int]]:
    h, v = int(config["hidden_size"]), int(config["vocab_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    i = int(config["intermediate_size"])
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = [v, h]
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": [heads * head_dim, h],
            p + "self_attn.k_proj.weight": [kv * head_dim, h],
            p + "self_attn.v_proj.weight": [kv * head_dim, h],
            p + "self_attn.o_proj.weight": [h, heads * head_dim],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
        })
    return shapes


def _check_config_matches_weights(config_path: Path, config: dict[str, Any],
                                  shapes: dict[str, tuple[list[int], Path]]) -> None:
    layers_in_weights = {int(m.group(1)) for name in shapes if (m := _LAYER.match(name))}
    declared = int(config["num_hidden_layers"])
    found = max(layers_in_weights) + 1 if layers_in_weights else 0
    if found != declared:
        raise BaseModelError(f"{config_path} does not match the weights: num_hidden_layers is "
                             f"{declared} but the weights hold {found} layers")
    for name, want in _expected_shapes(config, declared).items():
        if name not in shapes:
            raise BaseModelError(f"{config_path} does not match the weights: no tensor {name} "
                                 f"in {', '.join(sorted({p.name for _, p in shapes.values()}))}")
        have, file = shapes[name]
        if have != want:
            raise BaseModelError(f"{config_path} does not match the weights: {name} in "
                                 f"{file.name} has shape {have}, the config implies {want}")


def _token_id(tokenizer: dict[str, Any], token: Any) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def inspect_base_model(spec: str, roots: Iterable[Path], *, allow_pickle: bool = False
                       ) -> BaseModelInfo:
    """Check the base model directory `spec` and describe it, or raise `BaseModelError`."""
    directory = resolve_base_model_dir(spec, roots)
    config_path = directory / "config.json"
    config = _read_json(config_path)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise BaseModelError(
            f"{config_path}: unknown architecture model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); lmforge adapts "
            f"{', '.join(ARCHITECTURES)} models")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size") if not config.get(k)]
    if missing:
        raise BaseModelError(f"{config_path}: lacks {', '.join(missing)}")
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise BaseModelError(
            f"{tokenizer_path}: missing; the base model's fast tokenizer is needed (data-prep "
            "tokenizes with it, so the ids match the embeddings). Save it with "
            "`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`")
    tokenizer = _read_json(tokenizer_path)
    files, weight_format = _weight_files(directory, allow_pickle)
    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if weight_format == "safetensors":
        shapes: dict[str, tuple[list[int], Path]] = {}
        for file in files:
            shapes.update({n: (s, file) for n, s in safetensors_shapes(file).items()})
        _check_config_matches_weights(config_path, config, shapes)
        parameters = sum(math.prod(shape) for shape, _ in shapes.values())
    else:
        # Shapes cannot be read from a pickle without unpickling it: the config's count
        # (Qwen2's attention biases aside), and transformers checks the shapes at load.
        expected = _expected_shapes(config, int(config["num_hidden_layers"]))
        parameters = sum(math.prod(shape) for shape in expected.values())
    tokenizer_config_path = directory / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path) if tokenizer_config_path.exists() else {}
    generation_path = directory / GENERATION_CONFIG
    generation = _read_json(generation_path) if generation_path.exists() else {}
    eos = (_token_id(tokenizer, tokenizer_config.get("eos_token"))
           if tokenizer_config.get("eos_token") else None)
    if eos is None:
        eos = _first_id(generation.get("eos_token_id")) or _first_id(config.get("eos_token_id"))
    if eos is None:
        raise BaseModelError(f"{tokenizer_config_path}: names no eos_token (nor do config.json "
                             "or generation_config.json): documents could not be separated")
    pad = (_token_id(tokenizer, tokenizer_config.get("pad_token"))
           if tokenizer_config.get("pad_token") else None)
    if pad is None:
        pad = _first_id(config.get("pad_token_id")) or _first_id(generation.get("pad_token_id"))
    template_file = directory / CHAT_TEMPLATE_FILE
    template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                else tokenizer_config.get("chat_template"))
    return BaseModelInfo(
        directory=directory, family=str(model_type), hidden_size=h,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        parameters=parameters, weight_files=tuple(f.name for f in files),
        weight_format=weight_format, eos_token_id=eos, pad_token_id=pad,
        chat_template=template if isinstance(template, str) and template else None)


def load_base_model(info: BaseModelInfo, *, dtype: Any = None) -> PreTrainedModel:
    """The base's weights as a transformers model, from disk only (never the hub)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(info.directory), dtype=dtype or torch.float32, local_files_only=True,
        use_safetensors=info.weight_format == "safetensors")


def base_model_fingerprint(info: BaseModelInfo) -> str:
    """A digest of what makes the base what it is, for the stage caches: its config,
    tokenizer and generation files' bytes and its weight files' names and sizes (hashing
    gigabytes of weights on every event would cost more than the cache saves)."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("config.json", GENERATION_CONFIG, *TOKENIZER_FILES):
        path = info.directory / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name in info.weight_files:
        digest.update(f"{name}:{(info.directory / name).stat().st_size}\0".encode())
    return digest.hexdigest()
