"""exporter's bus wiring: model.quantized -> hf/ + onnx/ -> model.exported.

hf/ holds the weights model.quantized says to serve (served_weights.py): the
packed int4 directory as the quantizer wrote it, or fp32 with the reason.
"""

from __future__ import annotations

import asyncio
import json
import shutil

from lmforge.artifacts import StoredArtifact
from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.modeling import load_token_stream
from lmforge.service import Service
from services.exporter.onnx_export import (
    ONNX_OPSET,
    check_onnx_against_torch,
    export_logits_onnx,
)
from services.exporter.served_weights import ServedWeights, write_served_weights
from services.exporter.settings import ExporterSettings


class ExporterService(Service[ExporterSettings]):
    name = ServiceName.EXPORTER
    Settings = ExporterSettings

    @subscriber(subjects.MODEL_QUANTIZED, cache_outputs=(ev.ModelExported,))
    async def on_quantized(self, event: ev.ModelQuantized, delivery: Delivery
                           ) -> ev.ModelExported:
        model_dir, quantized_dir, dataset_dir = self.input_dirs(
            event.run_id, event.model, event.quantized, event.dataset)

        def export() -> tuple[float, StoredArtifact, ServedWeights]:
            work = self.store.scratch_dir("export-")
            hf_dir = work / "hf"
            served = write_served_weights(event, model_dir, quantized_dir, hf_dir)
            model = served.model
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
                                            tolerance=self.settings.exporter_onnx_tolerance)
            (work / "export.json").write_text(json.dumps({
                "source_model": event.model.digest,
                "quantized": event.quantized.digest, "served_weights": served.precision,
                "served_reason": served.reason, "onnx_max_abs_diff": diff,
                "onnx_opset": ONNX_OPSET}, indent=1))
            return diff, self.store.put_dir(work, move=True), served

        diff, stored, served = await asyncio.to_thread(export)
        return ev.ModelExported(
            run_id=event.run_id, model_name=event.model_name,
            export=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
            onnx_max_abs_diff=diff, onnx_opset=ONNX_OPSET,
            version=stored.digest.removeprefix("sha256:")[:12],
            precision=served.precision, precision_reason=served.reason,
        )
