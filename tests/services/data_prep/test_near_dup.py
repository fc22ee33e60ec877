from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.near_dup import (
    DUPLICATE,
    SEEN_BEFORE,
    MinHasher,
    NearDupConfig,
    NearDupStage,
    ReopenableDocuments,
    SignatureIndex,
    jaccard,
    lsh_bands,
    shingle_set,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "fortunes-sample.txt"
FORTUNES = [r.strip() for r in re.split(r"^%\s*$", DATA.read_text(), flags=re.M) if r.strip()]
_LONG = [f for f in FORTUNES if len(f.split()) >= 40]
NATURAL_PAIR = (_LONG[2], _LONG[3])
"""The one near-duplicate pair among the sample's long fortunes (Jaccard 0.78)."""
LONG_FORTUNES = _LONG[:3] + _LONG[4:]
"""Long fortunes, pairwise Jaccard < 0.3."""

# Two unrelated Chinese passages (written for these tests), long enough for 5-char shingles.
ZH_A = ("机器学习是人工智能的一个重要分支，它研究计算机怎样模拟或实现人类的学习行为，"
        "以获取新的知识或技能，重新组织已有的知识结构使之不断改善自身的性能。"
        "它是人工智能的核心，是使计算机具有智能的根本途径，其应用遍及人工智能的各个领域。")
ZH_B = ("长江是亚洲第一长河，发源于青藏高原的唐古拉山脉，干流流经青海、西藏、四川、云南、"
        "重庆、湖北、湖南、江西、安徽、江苏和上海，最后在崇明岛以东注入东海，全长六千三百多公里。")


class _Recorder(DecisionLog):
    """A DecisionLog that also keeps the decisions, for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list = []

    def record(self, decision) -> None:
        super().record(decision)
        self.decisions.append(decision)

    def by_id(self) -> dict:
        return {d.doc_id: d for d in self.decisions}


def _edit_words(text: str, n: int, rng: random.Random) -> str:
    words = text.split()
    for _ in range(n):
        words[rng.randrange(len(words))] = rng.choice(["zebra", "quartz", "violin", "maple"])
    return " ".join(words)


def _edit_chars(text: str, positions: list[int]) -> str:
    chars = list(text)
    for p in positions:
        chars[p] = "鑫"
    return "".join(chars)


def _run(docs: list[Document], config: NearDupConfig | None = None, **kw):
    stage = NearDupStage(config or NearDupConfig(), **kw)
    log = _Recorder()
    kept = list(stage.run(docs, log))
    return stage, log, kept


def test_vectorised_hashes_count_the_reference_shingles():
    texts = [LONG_FORTUNES[0], ZH_A, "Mixed 中文 text, with 日本語 and English words!", "",
             "?!...", "two words", "ＡＢＣ full-width ＡＢＣ", LONG_FORTUNES[1].upper()]
    hashes, doc = MinHasher(NearDupConfig()).shingle_hashes(texts)
    for i, text in enumerate(texts):
        assert len(set(hashes[doc == i].tolist())) == len(shingle_set(text)), text


def test_word_characters_are_those_of_the_regex_w_class():
    from services.data_prep.near_dup import _word_table

    table = _word_table()
    word = re.compile(r"\w")
    assert all(bool(word.match(chr(c))) == table[c] for c in range(0x10000)
               if not 0xD800 <= c < 0xE000)


def test_a_nul_inside_a_text_separates_words_and_not_documents():
    texts = ["alpha beta\x00gamma delta epsilon zeta", "eta theta"]
    _, doc = MinHasher(NearDupConfig(word_ngram=2)).shingle_hashes(texts)
    assert np.bincount(doc).tolist() == [5, 1]


def test_case_punctuation_and_layout_do_not_change_the_signature():
    base = LONG_FORTUNES[2]
    variant = base.upper().replace(",", " ;  ").replace(" ", "\n", 3)
    sig = MinHasher(NearDupConfig()).signatures([base, variant])
    assert shingle_set(base) == shingle_set(variant)
    assert (sig[0] == sig[1]).all()


def test_english_near_duplicates_cluster_and_unrelated_documents_do_not():
    rng = random.Random(0)
    base = LONG_FORTUNES[3]
    variants = [_edit_words(base, 1, rng), _edit_words(base, 2, rng)]
    assert all(jaccard(shingle_set(base), shingle_set(v)) >= 0.7 for v in variants)
    unrelated = LONG_FORTUNES[10:60]
    docs = [Document("base", base), *(Document(f"v{i}", v) for i, v in enumerate(variants)),
            *(Document(f"u{i}", t) for i, t in enumerate(unrelated))]
    _, log, kept = _run(docs, NearDupConfig(keep="first"))
    decisions = log.by_id()
    assert {d.doc_id for d in log.decisions if not d.kept} == {"v0", "v1"}
    assert all(decisions[v].reason == DUPLICATE for v in ("v0", "v1"))
    cluster = decisions["base"].cluster
    assert decisions["base"].kept and cluster.startswith("nd-")
    assert decisions["v0"].cluster == decisions["v1"].cluster == cluster
    assert [d.id for d in kept] == ["base", *(f"u{i}" for i in range(50))]
    assert log.counts == {("near_dup", DUPLICATE): 2}
    assert log.tallies[("near_dup", "clusters")] == 1


def test_chinese_near_duplicates_cluster_by_characters():
    close = _edit_chars(ZH_A, [20])  # one character: at most 5 of ~110 shingles change
    far = _edit_chars(ZH_A, list(range(5, len(ZH_A), 9)))  # every 9th: most shingles change
    assert jaccard(shingle_set(ZH_A), shingle_set(close)) >= 0.9
    assert jaccard(shingle_set(ZH_A), shingle_set(far)) < 0.3
    docs = [Document("a", ZH_A), Document("b", ZH_B), Document("close", close),
            Document("far", far)]
    _, log, kept = _run(docs)
    assert [d.id for d in kept] == ["a", "b", "far"]
    assert log.by_id()["close"].reason == DUPLICATE


def test_the_near_duplicate_the_shipped_fortunes_hold_is_found():
    docs = [Document(f"f{i}", t) for i, t in enumerate(FORTUNES)]
    _, log, kept = _run(docs, NearDupConfig(keep="first"))
    dropped = [d for d in log.decisions if not d.kept]
    assert [docs[int(d.doc_id[1:])].text for d in dropped] == [NATURAL_PAIR[1]]
    assert len(kept) == len(FORTUNES) - 1


def test_a_pair_just_below_the_threshold_is_kept_apart():
    rng = random.Random(1)
    base = " ".join(LONG_FORTUNES[4].split()[:60])
    below = base
    while jaccard(shingle_set(base), shingle_set(below)) >= 0.6:
        below = _edit_words(below, 1, rng)
    _, log, kept = _run([Document("a", base), Document("b", below)],
                        NearDupConfig(threshold=0.7))
    assert len(kept) == 2 and not log.counts


def test_keep_longest_or_first():
    base = LONG_FORTUNES[5]
    longer = base + " And that is the whole story."
    docs = [Document("short", base), Document("long", longer)]
    _, log, kept = _run(docs, NearDupConfig(keep="longest"))
    assert [d.id for d in kept] == ["long"]
    assert log.by_id()["short"].reason == DUPLICATE
    assert log.by_id()["long"].kept
    _, log, kept = _run(docs, NearDupConfig(keep="first"))
    assert [d.id for d in kept] == ["short"]
    assert log.by_id()["long"].reason == DUPLICATE


def test_a_second_run_drops_what_the_first_kept(tmp_path):
    rng = random.Random(2)
    first = [Document(f"r1-{i}", t) for i, t in enumerate(LONG_FORTUNES[:30])]
    first.append(Document("r1-dup", _edit_words(LONG_FORTUNES[0], 1, rng)))
    stage, _, kept = _run(first)
    assert len(kept) == 30
    stage.updated_index().save(tmp_path / "index")

    index = SignatureIndex.load(tmp_path / "index", NearDupConfig())
    assert len(index) == 30
    again = [Document(f"r2-{i}", _edit_words(t, 1, rng)) for i, t in enumerate(LONG_FORTUNES[:5])]
    fresh = [Document(f"new-{i}", t) for i, t in enumerate(LONG_FORTUNES[100:110])]
    stage2, log, kept = _run([*again, *fresh], seen=index)
    assert [d.id for d in kept] == [d.id for d in fresh]
    decisions = log.by_id()
    assert {decisions[d.id].reason for d in again} == {SEEN_BEFORE}
    assert decisions["r2-3"].detail.endswith("r1-3")
    assert len(stage2.updated_index()) == 40


def test_an_index_built_with_other_hashing_is_refused(tmp_path):
    SignatureIndex.empty(NearDupConfig(seed=1)).save(tmp_path / "index")
    with pytest.raises(ValueError, match=r"seed=1 \(now 2\)"):
        SignatureIndex.load(tmp_path / "index", NearDupConfig(seed=2))


def test_same_seed_same_clusters():
    rng = random.Random(3)
    docs = [Document(f"d{i}", t) for i, t in enumerate(LONG_FORTUNES[:80])]
    docs += [Document(f"v{i}", _edit_words(t, 2, rng)) for i, t in enumerate(LONG_FORTUNES[:20])]
    docs += [Document("zh", ZH_A), Document("zh-v", _edit_chars(ZH_A, [3, 60]))]
    runs = [_run(docs, NearDupConfig(seed=7)) for _ in range(2)]
    (s1, log1, kept1), (s2, log2, kept2) = runs
    assert [d.id for d in kept1] == [d.id for d in kept2]
    assert [(d.doc_id, d.cluster, d.reason) for d in log1.decisions] == \
        [(d.doc_id, d.cluster, d.reason) for d in log2.decisions]
    assert np.array_equal(_signatures(s1), _signatures(s2))
    other = _run(docs, NearDupConfig(seed=8))[0]
    assert not np.array_equal(_signatures(other), _signatures(s1))


def _signatures(stage: NearDupStage) -> np.ndarray:
    """A run's signatures (spooled by the stage), all rows."""
    assert stage.result is not None
    return stage.result.signatures.rows(0, len(stage.result.signatures))


def test_a_one_shot_iterator_is_spooled_under_work_dir_and_removed(tmp_path):
    rng = random.Random(4)
    texts = [*LONG_FORTUNES[:20], _edit_words(LONG_FORTUNES[0], 1, rng)]
    docs = [Document(f"d{i}", t, {"k": str(i)}, "src") for i, t in enumerate(texts)]
    stage = NearDupStage(NearDupConfig(keep="first"), work_dir=tmp_path / "work")
    kept = list(stage.run(iter(docs), DecisionLog()))
    assert kept == docs[:20]
    assert list((tmp_path / "work").iterdir()) == []
    with pytest.raises(ValueError, match="work_dir"):
        list(NearDupStage(NearDupConfig()).run(iter(docs), DecisionLog()))
    reopened = list(NearDupStage(NearDupConfig(keep="first")).run(
        ReopenableDocuments(lambda: iter(docs)), DecisionLog()))
    assert reopened == docs[:20]


def test_an_input_that_reads_differently_the_second_time_is_an_error():
    calls = []

    def opener():
        calls.append(1)
        return [Document(f"x{len(calls)}-{i}", t) for i, t in enumerate(LONG_FORTUNES[:3])]

    with pytest.raises(RuntimeError, match="must read the same"):
        list(NearDupStage(NearDupConfig()).run(ReopenableDocuments(opener), DecisionLog()))


def test_estimate_verification_finds_the_same_clusters():
    rng = random.Random(5)
    docs = [Document(f"d{i}", t) for i, t in enumerate(LONG_FORTUNES[:40])]
    docs += [Document(f"v{i}", _edit_words(t, 1, rng)) for i, t in enumerate(LONG_FORTUNES[:10])]
    _, log_exact, _ = _run(docs, NearDupConfig(verify="exact", keep="first"))
    _, log_est, _ = _run(docs, NearDupConfig(verify="estimate", keep="first"))
    assert {d.doc_id for d in log_exact.decisions if not d.kept} == \
        {d.doc_id for d in log_est.decisions if not d.kept} == {f"v{i}" for i in range(10)}


def test_signature_agreement_estimates_jaccard_without_bias():
    rng = random.Random(6)
    words = " ".join(FORTUNES).split()
    pairs = []
    for _ in range(150):
        start = rng.randrange(len(words) - 200)
        base = " ".join(words[start:start + 150])
        pairs.append((base, _edit_words(base, rng.randrange(1, 8), rng)))
    true = np.array([jaccard(shingle_set(a), shingle_set(b)) for a, b in pairs])
    sig = MinHasher(NearDupConfig(num_perm=128)).signatures([t for p in pairs for t in p])
    estimate = (sig[0::2] == sig[1::2]).mean(axis=1)
    assert abs((estimate - true).mean()) < 0.015  # 4 standard errors of the mean
    assert (estimate - true).std() < 0.05  # sqrt(J(1-J)/128) <= 0.044


def test_bands_and_rows_are_chosen_as_datasketch_chooses_them():
    assert lsh_bands(0.7, 128, 0.5) == (14, 9)  # datasketch.MinHashLSH(0.7, 128): b=14, r=9
    bands, rows = lsh_bands(0.7, 128, 0.9)
    assert bands * rows <= 128
    assert 1 - (1 - 0.7**rows) ** bands > 0.9  # a pair at the threshold is a candidate


def test_empty_input_and_documents_without_words_pass_through():
    assert _run([])[2] == []
    docs = [Document("a", ""), Document("b", "?!"), Document("c", "..."), Document("d", "word")]
    _, log, kept = _run(docs)
    assert kept == docs and not log.counts


def test_clusters_chain_through_union_find():
    words = LONG_FORTUNES[6].split()[:80]
    extra = [f"extra{i}" for i in range(16)]
    a = " ".join(words)
    b = " ".join([*words[8:], *extra[:8]])
    c = " ".join([*words[16:], *extra])
    sets = [shingle_set(t) for t in (a, b, c)]
    assert jaccard(sets[0], sets[1]) >= 0.7 and jaccard(sets[1], sets[2]) >= 0.7
    assert jaccard(sets[0], sets[2]) < 0.7  # a and c are joined through b
    docs = [Document("a", a), Document("b", b), Document("c", c),
            Document("x", LONG_FORTUNES[7])]
    _, log, kept = _run(docs, NearDupConfig(keep="first"))
    assert [d.id for d in kept] == ["a", "x"]
    clusters = {d.doc_id: d.cluster for d in log.decisions}
    assert clusters["a"] == clusters["b"] == clusters["c"]


def test_disabled_stage_passes_everything_through():
    docs = [Document("a", LONG_FORTUNES[0]), Document("b", LONG_FORTUNES[0])]
    _, log, kept = _run(docs, NearDupConfig(enabled=False))
    assert kept == docs and not log.decisions


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threshold", 1.0, "threshold 1.0 must be in"),
    ("num_perm", 8, "num_perm 8 must be in"),
    ("keep", "last", "keep 'last' must be"),
    ("verify", "maybe", "verify 'maybe' must be"),
])
def test_bad_config_says_what_is_wrong(field, value, message):
    with pytest.raises(ValueError, match=message):
        NearDupConfig(**{field: value})
