"""quantizer's bus wiring: model.trained -> RTN quantize + perplexity -> model.quantized."""

from __future__ import annotations

import asyncio
import json

from lmforge.artifacts import StoredArtifact
from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.modeling import load_causal_lm, load_token_stream, perplexity
from lmforge.service import Bus, Service
from services.quantizer.rtn import RtnConfig, write_quantized_model
from services.quantizer.settings import QuantizerSettings


class QuantizerService(Service[QuantizerSettings]):
    name = ServiceName.QUANTIZER
    Settings = QuantizerSettings

    def __init__(self, settings: QuantizerSettings, bus: Bus) -> None:
        super().__init__(settings, bus)
        try:
            self.config = RtnConfig(bits=settings.quantizer_bits,
                                    group_size=settings.quantizer_group_size)
        except ValueError as exc:
            raise SystemExit(f"invalid settings: LMFORGE_QUANTIZER_*: {exc}") from None

    @subscriber(subjects.MODEL_TRAINED, cache_outputs=(ev.ModelQuantized,))
    async def on_trained(self, event: ev.ModelTrained, delivery: Delivery) -> ev.ModelQuantized:
        model_dir, dataset_dir = self.input_dirs(event.run_id, event.model, event.dataset)
        config = self.config

        def quantize() -> tuple[float, float, StoredArtifact]:
            seq_len = json.loads((dataset_dir / "dataset.json").read_text())["seq_len"]
            heldout = load_token_stream(dataset_dir, "heldout")
            model = load_causal_lm(model_dir)
            before = perplexity(model, heldout, seq_len=seq_len)
            work = self.store.scratch_dir("quantized-")
            model.load_state_dict(write_quantized_model(model_dir, work, config))
            after = perplexity(model, heldout, seq_len=seq_len)
            return before, after, self.store.put_dir(work, move=True)

        before, after, stored = await asyncio.to_thread(quantize)
        return ev.ModelQuantized(
            run_id=event.run_id, model_name=event.model_name, model=event.model,
            quantized=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
            dataset=event.dataset, method=config.method, bits=config.bits,
            group_size=config.group_size, perplexity_before=before,
            perplexity_after=after,
            passed_quality_gate=after <= before * (1 + self.settings.quantizer_max_ppl_increase),
        )
