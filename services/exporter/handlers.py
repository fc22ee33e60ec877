"""exporter's bus wiring: model.quantized -> hf/ + onnx/ -> model.exported.

The served weights are the quantized ones when they passed the quality gate
(dequantized, so every runtime can load them), else the full-precision ones.
"""

from __future__ import annotations

import asyncio
import json
import shutil

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.bus import Delivery, StageError
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.modeling import load_causal_lm, load_dequantized_model, load_token_stream
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.exporter.onnx_export import (
    ONNX_OPSET,
    OnnxMismatchError,
    check_onnx_against_torch,
    export_logits_onnx,
)


class ExporterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    exporter_onnx_tolerance: float = Field(1e-3, gt=0, description="Max |ORT - PyTorch| logit.")


class ExporterService(Service):
    name = "exporter"
    Settings = ExporterSettings

    def register(self) -> None:
        s: ExporterSettings = self.settings  # type: ignore[assignment]

        @self.bus.subscriber(subjects.MODEL_QUANTIZED)
        async def on_quantized(event: ev.ModelQuantized, delivery: Delivery) -> ev.ModelExported:
            model_dir, quantized_dir, dataset_dir = self.input_dirs(
                event.run_id, event.model, event.quantized, event.dataset)

            def export():
                use_quantized = event.passed_quality_gate
                model = (load_dequantized_model(quantized_dir) if use_quantized
                         else load_causal_lm(model_dir))
                work = self.store.scratch_dir("export-")
                hf_dir = work / "hf"
                model.save_pretrained(str(hf_dir), safe_serialization=True)
                for item in model_dir.iterdir():
                    if item.is_file() and item.suffix == ".json" and item.name.startswith(
                        ("tokenizer", "special_tokens", "generation")
                    ):
                        shutil.copy2(item, hf_dir / item.name)
                max_seq = model.config.max_position_embeddings
                onnx_path = work / "onnx" / "model.onnx"
                export_logits_onnx(model, onnx_path, max_seq_len=max_seq)
                heldout = load_token_stream(dataset_dir, "heldout")
                diff = check_onnx_against_torch(model, onnx_path, heldout, max_seq_len=max_seq,
                                                tolerance=s.exporter_onnx_tolerance)
                (work / "export.json").write_text(json.dumps({
                    "model_name": event.model_name, "source_model": event.model.digest,
                    "quantized": event.quantized.digest, "served_weights":
                    event.method if use_quantized else "fp32", "onnx_max_abs_diff": diff,
                    "onnx_opset": ONNX_OPSET}, indent=1))
                return diff, self.store.put_dir(work, move=True)

            try:
                diff, stored = await asyncio.to_thread(export)
            except OnnxMismatchError as exc:
                raise StageError(f"export of run {event.run_id} refused: {exc}") from None
            return ev.ModelExported(
                run_id=event.run_id, model_name=event.model_name,
                export=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
                onnx_max_abs_diff=diff, onnx_opset=ONNX_OPSET,
                version=stored.digest.removeprefix("sha256:")[:12],
            )
