from __future__ import annotations

import pytest

from services.data_prep.documents import DecisionLog, Document
from services.data_prep.language import (
    LanguageConfig,
    LanguageFilter,
    LanguageIdentifier,
    language_detector,
)

ENGLISH = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."
CHINESE = "机器学习是人工智能的一个分支。它使计算机能够从数据中学习，而无需明确编程。"
GERMAN = "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer zusieht."
MIXED_ZH_MOSTLY = "我们的 team 在 Q3 review 里讨论了 latency 和 throughput 的 trade-off，下周再定。"
MIXED_EN_MOSTLY = ("The deploy failed again last night during the rollout. 日志里显示内存不足。 "
                   "I will retry tonight after the maintenance window closes.")


@pytest.fixture(scope="module")
def identifier() -> LanguageIdentifier:
    # language_detector is cached per candidate set: one lingua detector per test session.
    return LanguageIdentifier(LanguageConfig())


def test_english_chinese_and_german_are_named(identifier):
    assert identifier.language(ENGLISH) == "en"
    assert identifier.language(CHINESE) == "zh"
    assert identifier.language(GERMAN) == "de"


def test_a_mixed_document_gets_each_language_with_its_share_of_words(identifier):
    zh_mostly = identifier.shares(MIXED_ZH_MOSTLY)
    assert set(zh_mostly) == {"zh", "en"} and zh_mostly["zh"] > 0.5 > zh_mostly["en"] > 0.2
    # Eight Chinese characters among ~90 English letters: below mixed_script_min_share, so
    # the document is one English text.
    assert identifier.shares(MIXED_EN_MOSTLY) == {"en": 1.0}


def test_the_detector_is_built_once_per_candidate_set():
    assert language_detector(("en", "zh")) is language_detector(("en", "zh"))


def _run(config: LanguageConfig, *texts: str) -> tuple[list[str], DecisionLog]:
    log = DecisionLog()
    docs = [Document(f"d{i}", text) for i, text in enumerate(texts)]
    return [d.id for d in LanguageFilter(config).run(docs, log)], log


def test_documents_outside_the_allowed_languages_are_dropped_with_the_language_reason():
    kept, log = _run(LanguageConfig(allowed_languages=("en",)), ENGLISH, CHINESE, GERMAN)
    assert kept == ["d0"]
    assert log.counts == {("quality", "quality.language"): 2}


def test_mixed_chinese_and_english_is_kept_when_both_are_allowed():
    kept, _ = _run(LanguageConfig(allowed_languages=("en", "zh")), MIXED_ZH_MOSTLY,
                   MIXED_EN_MOSTLY, GERMAN)
    assert kept == ["d0", "d1"]


def test_a_mixed_document_follows_the_language_that_holds_most_of_its_words():
    kept, _ = _run(LanguageConfig(allowed_languages=("en",)), MIXED_ZH_MOSTLY, MIXED_EN_MOSTLY)
    assert kept == ["d1"]
    kept, _ = _run(LanguageConfig(allowed_languages=("zh",)), MIXED_ZH_MOSTLY, MIXED_EN_MOSTLY)
    assert kept == ["d0"]


def test_a_document_without_letters_has_no_language_and_is_dropped_when_languages_are_set(
        tmp_path):
    log = DecisionLog(tmp_path / "decisions.jsonl")
    kept = list(LanguageFilter(LanguageConfig(allowed_languages=("en",))).run(
        [Document("n", "12345 67 89")], log))
    log.close()
    assert kept == []
    assert '"detail": "undetermined"' in (tmp_path / "decisions.jsonl").read_text()


def test_no_allowed_languages_keeps_everything_without_detecting():
    kept, log = _run(LanguageConfig(), ENGLISH, CHINESE, "12345")
    assert kept == ["d0", "d1", "d2"] and not log.counts


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"allowed_languages": ("english",)}, "not an ISO 639-1 code"),
    ({"allowed_languages": ("sw",)}, "not among candidate_languages"),
    ({"min_allowed_share": 0.0}, "min_allowed_share"),
])
def test_a_bad_language_setting_is_refused_saying_why(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LanguageConfig(**kwargs)
