"""The data-prep stage as one function: a raw dataset in, a curated, tokenized one out.

read (files, directories, globs, s3://; every format) -> clean (normalise, drop
empty and exact duplicates) -> quality (Gopher/C4 rules, language) -> PII scrub
-> near-duplicate removal -> stable held-out split -> semantic (decontaminate
the training split against the held-out one, long-tail weights, the search
index) -> train the tokenizer on the training part -> pack both parts into
shards with per-document offsets and weights.

Every drop is recorded with its stage and reason code in a `DecisionLog`; the
counts go into dataset.json and the `dataset.prepared` event, and with
`report_dir` (the `lmforge prep` dry run) the per-document decisions too.
Kept documents are spooled to disk between the passes, and so are the semantic
stage's vectors and near-dup's signatures (unnamed files in `.spool`: 1.5 KB per
chunk and per document at 384 dims, 512 bytes of signatures per document), so
the texts and vectors are never all in memory. What memory still grows with the
dataset, per document: the exact-dedup digest (~100 bytes: a set of 32-byte
digests, for the whole run), near-dup's id, band keys and per-document arrays
(~300 bytes while it decides; freed once its index is written), the semantic
stage's ids and per-document arrays (~100 bytes) plus 8 bytes per chunk, and the
packer's offsets, weights and clusters (~20 bytes); and the search index while
it is built and saved (HNSW ~1.8 KB per chunk up to `hnsw_max`, 1M chunks;
IVF-PQ 446 bytes per chunk past it).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.base_models import BaseModelInfo
from lmforge.task_eval import EVAL_SET, EvalSetError, read_eval_set
from services.data_prep.chat import (
    PACKING_MODES,
    ChatRenderer,
    chat_template_for,
    check_trainable,
    encode_chat_documents,
)
from services.data_prep.cleaning import (
    ExactDeduplicator,
    document_digest,
    is_heldout,
    normalize_text,
)
from services.data_prep.documents import DecisionLog, Document
from services.data_prep.language import LanguageConfig, LanguageFilter
from services.data_prep.near_dup import NearDupConfig, NearDupStage, SignatureIndex
from services.data_prep.packing import ShardWriter, encode_documents, token_dtype
from services.data_prep.pii import PiiConfig, PiiScrubber
from services.data_prep.quality import QualityConfig, QualityFilter
from services.data_prep.semantic import SemanticConfig
from services.data_prep.semantic import curate as semantic_curate
from services.data_prep.sources import DataRoots, DatasetInputError, ReadConfig, iter_documents
from services.data_prep.tokenizer_choice import (
    DatasetTokenizer,
    base_tokenizer,
    trained_tokenizer,
)


@dataclass(kw_only=True, slots=True)
class PrepConfig:
    vocab_size: int = 4096
    """Target BPE vocabulary; smaller corpora stop earlier when merges run out."""
    seq_len: int = 128
    """Training context length recorded for the trainer and the scheduler."""
    heldout_fraction: float = 0.05
    """Share of documents (by hash) kept out of training for perplexity."""
    shard_tokens: int = 1_000_000
    """Tokens per shard file."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """How files are found and read (format, fields, caps, the S3 endpoint)."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Gopher/C4-style heuristics; `enabled=False` switches them off."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Allowed languages (empty: all, and no detection runs)."""
    pii: PiiConfig = field(default_factory=PiiConfig)
    """What personal data is replaced by typed placeholders before tokenizing."""
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)
    """MinHash + LSH near-duplicate removal."""
    semantic: SemanticConfig | None = None
    """Embeddings + FAISS: decontamination, optional semantic dedup, long-tail weights and
    the search index. None: off (the service turns it on: LMFORGE_DATAPREP_SEMANTIC)."""

    def __post_init__(self) -> None:
        if not 256 < self.vocab_size <= 1 << 20:
            raise ValueError(f"vocab_size {self.vocab_size} must be in (256, 1048576]")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction {self.heldout_fraction} must be in (0, 0.5)")

    @classmethod
    def hygiene_only(cls, **fields: Any) -> PrepConfig:
        """Reading, normalising and exact dedup only: no quality, PII or near-dup stage."""
        return cls(quality=QualityConfig(enabled=False), pii=PiiConfig(enabled=False),
                   near_dup=NearDupConfig(enabled=False), **fields)

    @property
    def max_record_bytes(self) -> int:
        return self.read.max_record_bytes

    def fingerprint(self) -> dict[str, Any]:
        """Everything that shapes the output, for the stage cache and dataset.json."""
        return asdict(self)


@dataclass(slots=True)
class PrepStats:
    """What preparing a dataset counted.

    `as_flat_dict()` has the field names of the `DatasetStats` event and of
    `dataset.json`'s "stats"; `dropped` and `tallies` are the DecisionLog's
    counts as `<stage>.<code>` / `<stage>.<what>` keys.
    """

    records_read: int = 0
    train_tokens: int = 0
    heldout_tokens: int = 0
    train_documents: int = 0
    heldout_documents: int = 0
    vocab_size: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tallies: dict[str, int] = field(default_factory=dict)

    @property
    def records_kept(self) -> int:
        return self.train_documents + self.heldout_documents

    def count(self, reason: str) -> int:
        return self.dropped.get(reason, 0)

    @property
    def empty_dropped(self) -> int:
        return self.count("clean.empty")

    @property
    def duplicates_dropped(self) -> int:
        return self.count("clean.exact_duplicate")

    @property
    def invalid_utf8_skipped(self) -> int:
        return self.count("read.invalid_utf8")

    @property
    def oversized_skipped(self) -> int:
        return self.count("read.oversized")

    @property
    def malformed_skipped(self) -> int:
        return sum(self.count(r) for r in ("read.malformed_json", "read.not_an_object",
                                           "read.missing_text", "read.malformed_csv",
                                           "read.malformed_chat"))

    def as_flat_dict(self) -> dict[str, Any]:
        return {
            "records_read": self.records_read, "records_kept": self.records_kept,
            "empty_dropped": self.empty_dropped, "duplicates_dropped": self.duplicates_dropped,
            "invalid_utf8_skipped": self.invalid_utf8_skipped,
            "oversized_skipped": self.oversized_skipped,
            "malformed_skipped": self.malformed_skipped,
            "train_tokens": self.train_tokens, "heldout_tokens": self.heldout_tokens,
            "train_documents": self.train_documents,
            "heldout_documents": self.heldout_documents, "vocab_size": self.vocab_size,
            "dropped": dict(self.dropped), "tallies": dict(self.tallies),
        }


class CleanStage:
    """Unicode normalisation, then empty and exact-duplicate documents out."""

    name = "clean"

    def run(self, docs: Iterable[Document], log: DecisionLog) -> Iterator[Document]:
        dedup = ExactDeduplicator()
        for doc in docs:
            if doc.messages is not None:
                # Each turn on its own: normalising the joined text could merge turns.
                doc = doc.with_messages([{"role": m["role"],
                                          "content": normalize_text(m["content"])}
                                         for m in doc.messages])
            else:
                doc.text = normalize_text(doc.text)
            if not doc.text:
                log.drop(doc, self.name, "clean.empty")
            elif dedup.is_duplicate(document_digest(doc.text)):
                log.drop(doc, self.name, "clean.exact_duplicate")
            else:
                yield doc


def curate(specs: str | Path | Sequence[str | Path], config: PrepConfig, log: DecisionLog, *,
           roots: Sequence[str | os.PathLike[str]] | DataRoots, work_dir: Path,
           seen: SignatureIndex | None = None) -> tuple[Iterator[Document], NearDupStage]:
    """The documents that survive reading, cleaning, quality, PII and near-dup removal.

    Lazily: nothing is read until the result is iterated. The near-dup stage is
    returned too, for its `updated_index()` once the documents are consumed.
    """
    spec_list = [os.fspath(s) for s in ([specs] if isinstance(specs, str | Path) else specs)]
    near_dup = NearDupStage(config.near_dup, work_dir=work_dir, seen=seen)
    docs: Iterable[Document] = iter_documents(spec_list, roots=roots, log=log,
                                              config=config.read, spool_dir=work_dir)
    for stage in (CleanStage(), QualityFilter(config.quality), LanguageFilter(config.language),
                  PiiScrubber(config.pii), near_dup):
        docs = stage.run(docs, log)
    return iter(docs), near_dup


def _spool(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            yield Document(item["id"], item["text"], item.get("meta", {}), item.get("source", ""),
                           item.get("messages"))


def _write(f: Any, doc: Document) -> None:
    item: dict[str, Any] = {"id": doc.id, "text": doc.text, "meta": doc.meta,
                            "source": doc.source}
    if doc.messages is not None:
        item["messages"] = doc.messages
    f.write(json.dumps(item, ensure_ascii=False) + "\n")


def _texts(path: Path) -> Iterator[str]:
    return (doc.text for doc in _spool(path))


def prepare_dataset(source: str | Path | Sequence[str | Path], fmt: str, text_field: str,
                    out_dir: Path, config: PrepConfig, *,
                    roots: Sequence[str | os.PathLike[str]] | DataRoots | None = None,
                    log: DecisionLog | None = None, seen: SignatureIndex | None = None,
                    kept_path: Path | None = None,
                    timings: dict[str, float] | None = None,
                    base: BaseModelInfo | None = None,
                    eval_set: Path | None = None, chat_template: str = "",
                    packing: str = "") -> PrepStats:
    """Build the dataset directory in `out_dir` (which must be empty or absent).

    `fmt` and `text_field` override the read config's ("" keeps it). `roots`
    are the allowed data roots; a direct call without them allows the source's
    own directory. With `kept_path`, the kept documents are also written there
    as JSONL (id, text, split, weight) for the `lmforge prep` dry run. `timings`, if
    given, gets the seconds of each phase (curate: read to near-dup and the split;
    semantic; tokenizer; pack) for the benchmark. With `base` (a checked base model),
    the documents are tokenized with the base's tokenizer instead of a trained one. With
    `eval_set` (a checked path), the labelled examples are stored in the dataset for the
    trainer and the quantizer to score. Chat records (every kept document, or none) are
    rendered with `chat_template` ("" = the tokenizer's) and stored with their loss mask;
    `packing` ("packed" or "unpacked"; "" = packed) tells the trainer how to lay them out.
    Either one given for a dataset without chat records is refused: it would be ignored.
    """
    if packing and packing not in PACKING_MODES:
        raise DatasetInputError(f"packing {packing!r} must be one of {', '.join(PACKING_MODES)}")
    clock = _PhaseClock(timings)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt or text_field:
        read = config.read
        config.read = ReadConfig(**{**asdict(read), "format": fmt or read.format,
                                    "text_field": text_field or read.text_field})
    if roots is None:
        first = Path(os.fspath(source if isinstance(source, str | Path) else source[0]))
        roots = [first.expanduser().resolve().parent]
    own_log = log is None
    log = log or DecisionLog()
    spool_dir = out_dir / ".spool"
    spool_dir.mkdir()
    train_spool, heldout_spool = spool_dir / "train.jsonl", spool_dir / "heldout.jsonl"
    stats = PrepStats()
    try:
        docs, near_dup = curate(source, config, log, roots=roots, work_dir=spool_dir, seen=seen)
        with train_spool.open("w", encoding="utf-8") as train_f, \
                heldout_spool.open("w", encoding="utf-8") as heldout_f:
            chat_documents = 0
            for doc in docs:
                chat_documents += doc.messages is not None
                if is_heldout(document_digest(doc.text), config.heldout_fraction):
                    _write(heldout_f, doc)
                    stats.heldout_documents += 1
                else:
                    _write(train_f, doc)
                    stats.train_documents += 1
        if config.near_dup.enabled:
            near_dup.save_updated_index(out_dir / "near_dup_index")
        clock.lap("curate")
        stats.records_read = log.tallies[("read", "records")]
        stats.dropped = {reason: n for (_, reason), n in sorted(log.counts.items())}
        stats.tallies = {f"{stage}.{what}": n for (stage, what), n in sorted(log.tallies.items())}

        if stats.train_documents == 0:
            raise DatasetInputError(
                f"dataset {source} has no usable documents (read {stats.records_read} "
                f"records; dropped: {_summary(stats.dropped) or 'none'})")
        kept = stats.train_documents + stats.heldout_documents
        if 0 < chat_documents < kept:
            raise DatasetInputError(
                f"dataset {source} mixes {chat_documents} chat records with "
                f"{kept - chat_documents} plain-text ones; a chat dataset trains on assistant "
                "turns only, so prepare the two as separate datasets")
        is_chat = chat_documents > 0
        if not is_chat and (chat_template or packing):
            raise DatasetInputError(
                f"a chat template or packing mode was given, but dataset {source} holds no "
                "chat records (JSONL with `messages`, or `prompt` and `response`)")
        if stats.heldout_documents == 0:
            # Tiny datasets: move one training document out so perplexity can be measured.
            moved = next(_spool(train_spool))
            rest = list(_spool(train_spool))[1:]
            if not rest:
                rest = [moved]  # a one-document dataset evaluates on its training text
            with train_spool.open("w", encoding="utf-8") as f:
                for doc in rest:
                    _write(f, doc)
            with heldout_spool.open("w", encoding="utf-8") as f:
                _write(f, moved)
            stats.train_documents, stats.heldout_documents = len(rest), 1

        clusters: np.ndarray | None = None
        if config.semantic is not None:
            clusters = _semantic(config.semantic, train_spool, heldout_spool, out_dir, log)
            stats.train_documents = sum(1 for _ in _spool(train_spool))
            stats.dropped = {reason: n for (_, reason), n in sorted(log.counts.items())}
            stats.tallies = {f"{stage}.{what}": n
                             for (stage, what), n in sorted(log.tallies.items())}

        clock.lap("semantic")
        chosen: DatasetTokenizer = (
            base_tokenizer(base, out_dir / "tokenizer") if base is not None
            else trained_tokenizer(_texts(train_spool), config.vocab_size,
                                   out_dir / "tokenizer", seq_len=config.seq_len))
        tokenizer, vocab_size, eos_id = chosen.tokenizer, chosen.vocab_size, chosen.eos_id
        renderer = ChatRenderer(out_dir / "tokenizer", chat_template_for(
            chat_template, chosen.chat_template, out_dir / "tokenizer", chosen.source)
        ) if is_chat else None
        clock.lap("tokenizer")
        dtype = token_dtype(vocab_size)
        parts: dict[str, dict[str, Any]] = {}
        weights: dict[str, np.ndarray] = {}
        cap = config.semantic.long_tail_cap if config.semantic is not None else 1.0
        for part, spool in (("train", train_spool), ("heldout", heldout_spool)):
            writer = ShardWriter(out_dir / part, config.shard_tokens, dtype, long_tail_cap=cap)
            # The packer turns clusters into weights on token counts (the trainer samples
            # tokens; per-character weights under-exposed the rarest clusters, 2.45x vs 2.66x).
            part_clusters = (iter(clusters)
                             if part == "train" and clusters is not None else None)
            if renderer is not None:
                tallies = encode_chat_documents(renderer, _spool(spool), eos_id, writer,
                                                seq_len=config.seq_len, clusters=part_clusters)
                for what, n in tallies.items():
                    stats.tallies[f"chat.{part}_{what}"] = n
                check_trainable(tallies, part, config.seq_len)
            else:
                encode_documents(tokenizer, _texts(spool), eos_id, writer,
                                 clusters=part_clusters)
            writer.close()
            parts[part] = writer.manifest()
            weights[part] = writer.weights
        clock.lap("pack")
        stats.train_tokens = int(parts["train"]["tokens"])
        stats.heldout_tokens = int(parts["heldout"]["tokens"])
        stats.vocab_size = vocab_size
        if kept_path is not None:
            with kept_path.open("w", encoding="utf-8") as f:
                for part, spool in (("train", train_spool), ("heldout", heldout_spool)):
                    for doc, weight in zip(_spool(spool), weights[part].tolist(), strict=True):
                        f.write(json.dumps({"id": doc.id, "text": doc.text, "split": part,
                                            "weight": round(weight, 4)},
                                           ensure_ascii=False) + "\n")
    finally:
        for path in (train_spool, heldout_spool):
            path.unlink(missing_ok=True)
        for leftover in spool_dir.iterdir():
            leftover.unlink()
        spool_dir.rmdir()
        if own_log:
            log.close()
    metadata = {
        "format": "lmforge-token-shards/2",
        "vocab_size": vocab_size,
        "seq_len": config.seq_len,
        "eos_token_id": eos_id,
        "pad_token_id": chosen.pad_id,
        "tokenizer": chosen.source,
        "dtype": dtype.name,
        "train": parts["train"],
        "heldout": parts["heldout"],
        "stats": stats.as_flat_dict(),
    }
    if is_chat:
        metadata["chat"] = {"packing": packing or "packed",
                            "template": "user" if chat_template else chosen.source}
    if eval_set is not None:
        try:
            examples = read_eval_set(eval_set)
        except (EvalSetError, OSError, UnicodeDecodeError) as exc:
            raise DatasetInputError(f"eval set: {exc}") from None
        (out_dir / EVAL_SET).parent.mkdir(parents=True, exist_ok=True)
        with (out_dir / EVAL_SET).open("w", encoding="utf-8") as f:
            for example in examples:
                f.write(json.dumps({"prompt": example.prompt, "answer": example.answer},
                                   ensure_ascii=False) + "\n")
        metadata["eval_set"] = EVAL_SET
    (out_dir / "dataset.json").write_text(json.dumps(metadata, indent=1))
    return stats


def _semantic(config: SemanticConfig, train_spool: Path, heldout_spool: Path, out_dir: Path,
              log: DecisionLog) -> np.ndarray:
    """Decontaminate the training split in place, save the search index, and return each
    kept training document's embedding cluster, in spool order (the packer weights the
    long tail by them).

    The spools are streamed (embedding, then the index's chunk texts, then the rewrite);
    the vectors are spooled beside them (`semantic.curate` says what stays in memory).
    """
    result = semantic_curate(lambda: _spool(train_spool), lambda: _spool(heldout_spool),
                             config, log, work_dir=train_spool.parent)
    if result.index is not None:
        result.index.save(out_dir / "semantic_index")
    if not result.keep.all():
        kept_spool = train_spool.with_suffix(".kept")
        with kept_spool.open("w", encoding="utf-8") as f:
            for doc, kept in zip(_spool(train_spool), result.keep.tolist(), strict=True):
                if kept:
                    _write(f, doc)
        kept_spool.replace(train_spool)
    return result.labels


class _PhaseClock:
    """Seconds per phase into `timings` (nothing when it is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.timings is not None:
            self.timings[phase] = round(now - self.last, 3)
        self.last = now


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda x: -x[1]))
