"""data-prep's bus wiring: dataset.ready -> prepare_dataset -> dataset.prepared.

The stage is cached on the dataset's contents: the same bytes under another
path, or a touched file, reuse the earlier dataset for the new run.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

from google.protobuf.message import Message

from lmforge.contracts import subjects
from lmforge.contracts.names import ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.failures import BadInput
from lmforge.service import Service
from services.data_prep.prepare import PrepConfig, prepare_dataset
from services.data_prep.reading import FORMATS, resolve_dataset_path
from services.data_prep.settings import DataPrepSettings

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def validate_request(event: ev.DatasetReady) -> None:
    if not RUN_ID.match(event.run_id):
        raise BadInput(f"run_id {event.run_id!r} must be 1-64 letters, digits, '-' or '_'")
    if not MODEL_NAME.match(event.model_name):
        raise BadInput(
            f"model_name {event.model_name!r} must be 1-64 letters, digits, '.', '-' or '_'"
        )
    if event.format not in FORMATS:
        raise BadInput(f"format {event.format!r} is not supported; use one of {FORMATS}")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dataset_prepared(event: ev.DatasetReady, config: PrepConfig, digest: str, size: int,
                     stats: dict[str, int]) -> ev.DatasetPrepared:
    return ev.DatasetPrepared(
        run_id=event.run_id, model_name=event.model_name,
        dataset=ev.ArtifactRef(digest=digest, size_bytes=size),
        vocab_size=stats["vocab_size"], seq_len=config.seq_len,
        time_budget_s=event.time_budget_s,
        stats=ev.DatasetStats(**{k: v for k, v in stats.items()
                                 if k in ev.DatasetStats.DESCRIPTOR.fields_by_name}))


class DataPrepService(Service[DataPrepSettings]):
    name = ServiceName.DATA_PREP
    Settings = DataPrepSettings

    @property
    def prep_config(self) -> PrepConfig:
        s = self.settings
        return PrepConfig(vocab_size=s.dataprep_vocab_size, seq_len=s.dataprep_seq_len,
                          heldout_fraction=s.dataprep_heldout_fraction,
                          max_record_bytes=s.dataprep_max_record_bytes)

    def _source(self, event: ev.DatasetReady) -> Path:
        validate_request(event)
        return resolve_dataset_path(event.dataset_uri, self.settings.data_roots)

    async def stage_inputs(self, event: Message) -> bytes:
        """The request without its path, plus the digest of the file's bytes."""
        assert isinstance(event, ev.DatasetReady)
        source = self._source(event)
        request = ev.DatasetReady(format=event.format, text_field=event.text_field,
                                  time_budget_s=event.time_budget_s)
        contents = await asyncio.to_thread(file_digest, source)
        return request.SerializeToString(deterministic=True) + contents.encode()

    @subscriber(subjects.DATASET_READY, cache_outputs=(ev.DatasetPrepared,))
    async def on_dataset_ready(self, event: ev.DatasetReady, delivery: Delivery
                               ) -> ev.DatasetPrepared:
        source = self._source(event)
        config = self.prep_config
        work = self.store.scratch_dir("dataset-")
        stats = await asyncio.to_thread(prepare_dataset, source, event.format,
                                        event.text_field or "text", work, config)
        stored = await asyncio.to_thread(self.store.put_dir, work, move=True)
        return dataset_prepared(event, config, stored.digest, stored.size_bytes,
                                stats.as_flat_dict())
