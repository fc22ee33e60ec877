"""data-prep's bus wiring: dataset.ready -> prepare_dataset -> dataset.prepared.

The stage is cached on the dataset's contents: the same bytes under another
path, or a touched file, reuse the earlier dataset for the new run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from lmforge.base_models import BaseModelInfo, base_model_fingerprint, inspect_base_model
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket, ServiceName
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.dispatch import Delivery, subscriber
from lmforge.failures import BadInput
from lmforge.quantization_request import quantization_overrides, write_overrides
from lmforge.service import Service
from services.data_prep.documents import DecisionLog
from services.data_prep.metrics import record_prepared
from services.data_prep.near_dup import SignatureIndex
from services.data_prep.prepare import PrepConfig, PrepStats, prepare_dataset
from services.data_prep.settings import DataPrepSettings
from services.data_prep.sources import (
    FORMATS,
    DataRoots,
    SourceFile,
    dataset_digest,
    list_dataset_files,
)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

log = logging.getLogger("lmforge.data_prep")


def validate_request(event: ev.DatasetReady) -> None:
    if not RUN_ID.match(event.run_id):
        raise BadInput(f"run_id {event.run_id!r} must be 1-64 letters, digits, '-' or '_'")
    if not MODEL_NAME.match(event.model_name):
        raise BadInput(
            f"model_name {event.model_name!r} must be 1-64 letters, digits, '.', '-' or '_'"
        )
    if event.format and event.format not in FORMATS:
        raise BadInput(f"format {event.format!r} is not supported; use one of {FORMATS}")


def dataset_prepared(event: ev.DatasetReady, config: PrepConfig, digest: str, size: int,
                     stats: PrepStats) -> ev.DatasetPrepared:
    flat = stats.as_flat_dict()
    scalars = {k: v for k, v in flat.items()
               if k in ev.DatasetStats.DESCRIPTOR.fields_by_name and isinstance(v, int)}
    return ev.DatasetPrepared(
        run_id=event.run_id, model_name=event.model_name,
        dataset=ev.ArtifactRef(digest=digest, size_bytes=size),
        vocab_size=stats.vocab_size, seq_len=config.seq_len,
        time_budget_s=event.time_budget_s, training=event.training,
        stats=ev.DatasetStats(**scalars, dropped=stats.dropped, tallies=stats.tallies))


def model_dataset_key(event: ev.DatasetReady) -> str:
    """The model's last dataset, per tenant: two tenants' models of one name never dedup
    against each other's data (which would tell one what the other trained on). The
    tenant is the one NATS vouched for (`dispatch`); an untenanted run keeps the bare name."""
    return f"{event.tenant}.{event.model_name}" if event.tenant else event.model_name


class DataPrepService(Service[DataPrepSettings]):
    name = ServiceName.DATA_PREP
    Settings = DataPrepSettings

    @property
    def prep_config(self) -> PrepConfig:
        return self.settings.prep_config()

    def data_roots(self, tenant: str) -> DataRoots:
        """Where a run of `tenant` (the one NATS vouched for: `dispatch`) may read: its own
        roots with LMFORGE_TENANT_DATA_ROOTS set, else LMFORGE_DATA_ROOTS."""
        roots = self.settings.data_roots_for(tenant)
        setting = (f"LMFORGE_TENANT_DATA_ROOTS[{tenant}]"
                   if tenant and self.settings.tenant_data_roots else "LMFORGE_DATA_ROOTS")
        return DataRoots.parse(roots, setting=setting)

    def _specs(self, event: ev.DatasetReady) -> list[SourceFile]:
        """The dataset's files, each checked against the allowed roots (or BadInput)."""
        validate_request(event)
        config = self.prep_config
        return list_dataset_files(event.dataset_uri, self.data_roots(event.tenant),
                                  config=replace(config.read, format=event.format or "auto"))

    def base_model(self, event: ev.DatasetReady) -> BaseModelInfo | None:
        """The run's base model, checked (or BaseModelError naming the file and reason)."""
        if not event.training.base_model:
            return None
        return inspect_base_model(event.training.base_model,
                                  self.settings.base_model_roots(event.tenant),
                                  allow_pickle=self.settings.base_model_allow_pickle)

    @staticmethod
    def quantization(event: ev.DatasetReady) -> dict[str, Any]:
        """The run's own quantizer choices, checked now rather than after training."""
        try:
            return quantization_overrides(event.quantization)
        except ValueError as exc:
            raise BadInput(f"quantization: {exc}") from None

    def eval_set(self, event: ev.DatasetReady) -> Path | None:
        """The run's labelled eval set, checked against the data roots."""
        if not event.training.eval_set:
            return None
        path = Path(event.training.eval_set).expanduser().resolve()
        roots = self.data_roots(event.tenant)
        if not roots.allows_path(path):
            raise BadInput(f"eval set '{path}' is outside the allowed roots "
                           f"({roots.setting}={roots.describe()})")
        if not path.is_file():
            raise BadInput(f"eval set '{path}' does not exist or is not a file")
        return path

    async def stage_inputs(self, event: Message) -> bytes:
        """The request without its path, the digest of the dataset's bytes (every file), the
        base model's fingerprint, and the earlier dataset whose near-dup index this run
        dedups against, if any."""
        assert isinstance(event, ev.DatasetReady)
        files = await asyncio.to_thread(self._specs, event)
        base = await asyncio.to_thread(self.base_model, event)
        request = ev.DatasetReady(format=event.format, text_field=event.text_field,
                                  time_budget_s=event.time_budget_s, training=event.training,
                                  quantization=event.quantization)
        contents = await asyncio.to_thread(dataset_digest, files, config=self.prep_config.read)
        earlier = await self._earlier_dataset(event)
        base_print = base_model_fingerprint(base) if base is not None else ""
        eval_path = await asyncio.to_thread(self.eval_set, event)
        if eval_path is not None:
            base_print += "|" + hashlib.sha256(eval_path.read_bytes()).hexdigest()
        return request.SerializeToString(deterministic=True) + \
            f"{contents}|{earlier}|{base_print}".encode()

    async def _earlier_dataset(self, event: ev.DatasetReady) -> str:
        if not self.settings.dataprep_near_dup_earlier_runs:
            return ""
        digest = await self.bus.key_value(Bucket.MODEL_DATASETS).get(model_dataset_key(event))
        return digest.decode() if digest else ""

    def _earlier_index(self, digest: str, config: PrepConfig, decisions: DecisionLog
                       ) -> SignatureIndex | None:
        if not digest:
            return None
        (earlier,) = self.input_dirs("(the model's earlier dataset)",
                                     ev.ArtifactRef(digest=digest))
        index_dir = earlier / "near_dup_index"
        if not index_dir.exists():
            # Prepared with near-dup removal off: there is nothing to compare against, and
            # the user asked for the comparison, so say so (log line and event tally).
            log.warning("near-dup against earlier runs: the model's earlier dataset %s "
                           "has no near-dup index (prepared with near-dup removal off); "
                           "this run is not deduplicated against it", digest[:12])
            decisions.count("near_dup", "earlier_index_missing")
            return None
        return SignatureIndex.load(index_dir, config.near_dup)

    @subscriber(subjects.DATASET_READY, cache_outputs=(ev.DatasetPrepared,))
    async def on_dataset_ready(self, event: ev.DatasetReady, delivery: Delivery
                               ) -> ev.DatasetPrepared:
        await asyncio.to_thread(self._specs, event)
        quantization = self.quantization(event)
        base = await asyncio.to_thread(self.base_model, event)
        eval_path = await asyncio.to_thread(self.eval_set, event)
        config = self.prep_config
        earlier = await self._earlier_dataset(event)
        decisions = DecisionLog()
        seen = await asyncio.to_thread(self._earlier_index, earlier, config, decisions)
        work = self.store.scratch_dir("dataset-")
        stats = await asyncio.to_thread(
            prepare_dataset, event.dataset_uri, event.format, event.text_field or "text", work,
            config, roots=self.data_roots(event.tenant), seen=seen, log=decisions, base=base,
            eval_set=eval_path, chat_template=event.training.chat_template,
            packing=event.training.packing)
        write_overrides(work, quantization)
        stored = await asyncio.to_thread(self.store.put_dir, work, move=True)
        record_prepared(stats)
        if self.settings.dataprep_near_dup_earlier_runs:
            await self.bus.key_value(Bucket.MODEL_DATASETS).put(model_dataset_key(event),
                                                                stored.digest.encode())
        return dataset_prepared(event, config, stored.digest, stored.size_bytes, stats)
