"""exporter's bus wiring: model.quantized -> export directory -> model.exported.

hf/ holds the weights model.quantized says to serve (served_weights.py): the
packed int4 directory as the quantizer wrote it, or fp32 with the reason. The
ONNX graphs and the Triton repository beside it are packaging.py's. export.json
also carries the eval set's figures (fp and quantized, and which is served), which
the gateway shows in /v1/models.
"""

from __future__ import annotations

import asyncio

from lmforge.artifacts import StoredArtifact
from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.modeling import load_token_stream
from lmforge.service import Service
from lmforge.task_eval import quantized_run_figures
from services.exporter.packaging import ExportOptions, ExportReport, write_export
from services.exporter.served_weights import ServedWeights, write_served_weights
from services.exporter.settings import ExporterSettings
from services.exporter.triton_repository import TritonModelOptions


class ExporterService(Service[ExporterSettings]):
    name = ServiceName.EXPORTER
    Settings = ExporterSettings

    def export_options(self) -> ExportOptions:
        s = self.settings
        return ExportOptions(
            tolerance=s.exporter_onnx_tolerance, int8=s.exporter_onnx_int8,
            perplexity_windows=s.exporter_onnx_perplexity_windows,
            triton=TritonModelOptions(name=s.exporter_triton_model_name,
                                      max_batch_size=s.exporter_triton_max_batch_size,
                                      instance_kind=s.exporter_triton_instance_kind,
                                      instance_count=s.exporter_triton_instance_count))

    @subscriber(subjects.MODEL_QUANTIZED, cache_outputs=(ev.ModelExported,))
    async def on_quantized(self, event: ev.ModelQuantized, delivery: Delivery
                           ) -> ev.ModelExported:
        model_dir, quantized_dir, dataset_dir = self.input_dirs(
            event.run_id, event.model, event.quantized, event.dataset)

        def export() -> tuple[ExportReport, StoredArtifact, ServedWeights]:
            work = self.store.scratch_dir("export-")
            served = write_served_weights(event, model_dir, quantized_dir, work / "hf")
            report = write_export(
                served.model, model_dir, load_token_stream(dataset_dir, "heldout"), work,
                self.export_options(),
                {"source_model": event.model.digest, "quantized": event.quantized.digest,
                 "served_weights": served.precision, "served_reason": served.reason,
                 # With the weights they describe, so the gateway reads them from what
                 # it loads (at a deploy and at a replica's restore alike).
                 "task_eval": quantized_run_figures(event)})
            return report, self.store.put_dir(work, move=True), served

        report, stored, served = await asyncio.to_thread(export)
        return ev.ModelExported(
            run_id=event.run_id, model_name=event.model_name,
            export=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
            onnx_max_abs_diff=report.onnx_max_abs_diff, onnx_opset=report.onnx_opset,
            onnx_parity_steps=report.onnx_parity_steps,
            onnx_heldout_perplexity=report.onnx_heldout_perplexity,
            onnx_int8_heldout_perplexity=report.onnx_int8_heldout_perplexity,
            triton_model=report.triton_model,
            version=stored.digest.removeprefix("sha256:")[:12],
            precision=served.precision, precision_reason=served.reason,
        )
