"""quantizer's bus wiring: model.trained -> RTN quantize + perplexity -> model.quantized."""

from __future__ import annotations

import asyncio
import json

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lmforge.bus import Delivery
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.modeling import load_causal_lm, load_token_stream, perplexity
from lmforge.service import Service
from lmforge.settings import ServiceSettings
from services.quantizer.rtn import RtnConfig, write_quantized_model


class QuantizerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LMFORGE_", extra="ignore", frozen=True)

    quantizer_bits: int = Field(8, description="4 or 8.")
    quantizer_group_size: int = Field(0, ge=0, description="0 = per output channel.")
    quantizer_max_ppl_increase: float = Field(
        0.05, ge=0, description="Quality gate: largest relative perplexity increase accepted."
    )


class QuantizerService(Service):
    name = "quantizer"
    Settings = QuantizerSettings

    def register(self) -> None:
        s: QuantizerSettings = self.settings  # type: ignore[assignment]
        try:
            config = RtnConfig(bits=s.quantizer_bits, group_size=s.quantizer_group_size)
        except ValueError as exc:
            raise SystemExit(f"invalid settings: LMFORGE_QUANTIZER_*: {exc}") from None

        @self.bus.subscriber(subjects.MODEL_TRAINED)
        async def on_trained(event: ev.ModelTrained, delivery: Delivery) -> ev.ModelQuantized:
            model_dir, dataset_dir = self.input_dirs(event.run_id, event.model, event.dataset)

            def quantize():
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
                passed_quality_gate=after <= before * (1 + s.quantizer_max_ppl_increase),
            )
