"""data-prep's bus wiring: dataset.ready -> prepare_dataset -> dataset.prepared."""

from __future__ import annotations

import asyncio
import re

from lmforge.bus import Delivery, StageError
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.service import Service
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.data_prep.reading import FORMATS, DatasetInputError, resolve_dataset_path
from services.data_prep.settings import DataPrepSettings

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_request(event: ev.DatasetReady) -> None:
    if not RUN_ID.match(event.run_id):
        raise StageError(f"run_id {event.run_id!r} must be 1-64 letters, digits, '-' or '_'")
    if not MODEL_NAME.match(event.model_name):
        raise StageError(
            f"model_name {event.model_name!r} must be 1-64 letters, digits, '.', '-' or '_'"
        )
    if event.format not in FORMATS:
        raise StageError(f"format {event.format!r} is not supported; use one of {FORMATS}")


class DataPrepService(Service):
    name = "data-prep"
    Settings = DataPrepSettings

    def register(self) -> None:
        settings: DataPrepSettings = self.settings  # type: ignore[assignment]
        config = PrepConfig(
            vocab_size=settings.dataprep_vocab_size,
            seq_len=settings.dataprep_seq_len,
            heldout_fraction=settings.dataprep_heldout_fraction,
            max_record_bytes=settings.dataprep_max_record_bytes,
        )

        @self.bus.subscriber(subjects.DATASET_READY)
        async def on_dataset_ready(event: ev.DatasetReady, delivery: Delivery
                                   ) -> ev.DatasetPrepared:
            validate_request(event)
            try:
                source = resolve_dataset_path(event.dataset_uri, settings.data_roots)
            except DatasetInputError as exc:
                raise StageError(str(exc)) from None
            work = self.store.scratch_dir("dataset-")
            try:
                stats = await asyncio.to_thread(
                    prepare_dataset, source, event.format, event.text_field or "text",
                    work, config,
                )
            except DatasetInputError as exc:
                raise StageError(str(exc)) from None
            stored = await asyncio.to_thread(self.store.put_dir, work, move=True)
            return ev.DatasetPrepared(
                run_id=event.run_id,
                model_name=event.model_name,
                dataset=ev.ArtifactRef(digest=stored.digest, size_bytes=stored.size_bytes),
                vocab_size=stats.vocab_size,
                seq_len=config.seq_len,
                time_budget_s=event.time_budget_s,
                stats=ev.DatasetStats(
                    records_read=stats.records_read,
                    records_kept=stats.records_kept,
                    empty_dropped=stats.empty_dropped,
                    duplicates_dropped=stats.duplicates_dropped,
                    invalid_utf8_skipped=stats.invalid_utf8_skipped,
                    oversized_skipped=stats.oversized_skipped,
                    malformed_skipped=stats.malformed_skipped,
                    train_tokens=stats.train_tokens,
                    heldout_tokens=stats.heldout_tokens,
                    train_documents=stats.train_documents,
                    heldout_documents=stats.heldout_documents,
                ),
            )
